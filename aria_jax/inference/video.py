"""Video input on PyAV: probe a file's header, sample frames as the original Aria does, decode only those frames
(keyframe seek, then decode forward), and expand a video into the chat content items the original renders.

The original's video notebook samples the centres of ``num_frames`` equal segments, frame
``int(total_frames / num_frames * (i + 0.5))``, with timestamps ``index / fps``; each frame becomes a text item
``"[MM:SS]"``, an image item and a text item ``"\\n"`` (``video_content``), frames at ``max_image_size`` 490
(``VIDEO_IMAGE_SIZE``: 128 tokens each). Every failure to read a file is one ``VideoError`` line naming it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from aria_jax.errors import InputError, one_line

VIDEO_IMAGE_SIZE = 490  # the original's max_image_size for video frames (128 tokens per frame)
DEFAULT_NUM_FRAMES = 8  # the original's training default (its notebook uses 128)
_PAST_END = 2  # frames a header's count may exceed the frames that decode (duration x rate rounding)
def _av():
    """PyAV, imported when a video is read (an image-only or text-only run, or a device machine without PyAV, never
    needs it)."""
    import av  # noqa: PLC0415

    return av


def _decode_errors() -> tuple[type[BaseException], ...]:
    return (_av().FFmpegError, OSError, ValueError, RuntimeError, EOFError, MemoryError)


class VideoError(InputError):
    """A video file that cannot be used: missing, empty, not a video, no frames, or frames that do not decode."""


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: frame count (from the header's count, or duration x average frame rate),
    average frame rate, frame size."""

    frames: int
    fps: float
    width: int
    height: int


@dataclass(frozen=True)
class Video:
    """Sampled frames of one video (RGB PIL images), their frame indices and timestamps (index / fps seconds)."""

    frames: list[Image.Image]
    indices: list[int]
    timestamps: list[float] | None
    info: VideoInfo | None = None
    path: str | None = field(default=None, compare=False)

    def content(self, timestamps: bool = True) -> list[dict[str, Any]]:
        """The chat content items for these frames (``video_content``); ``timestamps=False``: the plain form."""
        if timestamps and self.timestamps is not None:
            return video_content(self.timestamps)
        return video_content(None, num_frames=len(self.frames))


# ---------------------------------------------------------------------------------------------------- header


def _name(path: str | os.PathLike) -> str:
    return os.fspath(path)


def _open(path: str | os.PathLike) -> Any:
    name = _name(path)
    if not os.path.exists(name):
        raise VideoError(f"{name}: no such video file")
    if os.path.isdir(name):
        raise VideoError(f"{name}: is a directory, not a video file")
    try:
        if os.path.getsize(name) == 0:
            raise VideoError(f"{name}: empty file, not a video")
        return _av().open(name, mode="r")
    except VideoError:
        raise
    except _decode_errors() as e:
        raise VideoError(f"{name}: cannot read as a video ({_reason(e)})") from None


def _reason(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    return strerror if isinstance(strerror, str) and strerror else one_line(exc)


def _video_stream(container: Any, name: str) -> Any:
    streams = list(container.streams.video)
    if not streams:
        raise VideoError(f"{name}: no video stream (or one without frames)")
    return streams[0]


def _rate(stream: Any) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0 and math.isfinite(float(rate)):
            return float(rate)
    return 0.0


def _duration(container: Any, stream: Any) -> float:
    """The video stream's duration in seconds: its own, or Matroska's per-track ``DURATION`` tag, else the
    container's (which an audio track may lengthen)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = next((v for k, v in (stream.metadata or {}).items() if k.upper() == "DURATION"), None)
    try:
        hours, minutes, seconds = str(tag).split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        pass
    if container.duration:
        return container.duration / _av().time_base
    return 0.0


def probe(path: str | os.PathLike) -> VideoInfo:
    """The header's frame count, frame rate and size, without decoding; ``VideoError`` for a file that cannot be
    read, has no video stream, no frame rate or no frames."""
    name = _name(path)
    container = _open(path)
    try:
        stream = _video_stream(container, name)
        fps = _rate(stream)
        if fps <= 0:
            raise VideoError(f"{name}: the video stream has no frame rate")
        frames = int(stream.frames or 0)
        if frames <= 0:
            frames = int(round(_duration(container, stream) * fps))
        if frames <= 0:
            raise VideoError(f"{name}: the video has no frames")
        ctx = stream.codec_context
        return VideoInfo(frames=frames, fps=fps, width=int(ctx.width or 0), height=int(ctx.height or 0))
    except VideoError:
        raise
    except _decode_errors() as e:
        raise VideoError(f"{name}: cannot read the video header ({_reason(e)})") from None
    finally:
        container.close()


# ---------------------------------------------------------------------------------------------------- sampling


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise InputError(f"{what} must be a positive number, got {value!r}")
    return number


def sample_indices(
    total_frames: int,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
    max_frames: int | None = None,
) -> list[int]:
    """Frame indices at the centres of equal segments, the original's ``int(total / n * (i + 0.5))``.

    ``n`` is ``num_frames`` (8 when neither it nor ``fps`` is given), or with ``fps`` (frames per second of video,
    ``video_fps`` the video's own rate) ``max(1, round(total_frames / video_fps * fps))``; ``max_frames`` caps ``n``.
    As in the original, ``n`` above ``total_frames`` repeats frames.
    """
    total = _positive_int(total_frames, "total_frames")
    if num_frames is not None and fps is not None:
        raise InputError("give num_frames or fps, not both")
    if fps is not None:
        rate = _positive_float(fps, "fps")
        if video_fps is None:
            raise InputError("fps-based sampling needs the video's frame rate (video_fps)")
        seconds = total / _positive_float(video_fps, "video_fps")
        count = max(1, int(round(seconds * rate)))
    else:
        count = DEFAULT_NUM_FRAMES if num_frames is None else _positive_int(num_frames, "num_frames")
    if max_frames is not None:
        count = min(count, _positive_int(max_frames, "max_frames"))
    return [int(total / count * (i + 0.5)) for i in range(count)]


# ---------------------------------------------------------------------------------------------------- decoding


class _Frames:
    """Decoded frames with their indices: from presentation timestamps and the average frame rate where the
    stream has them (then a far-away target is reached by a keyframe seek), else by counting from the start."""

    def __init__(self, container: Any, stream: Any) -> None:
        self.container, self.stream = container, stream
        self.fps = _rate(stream)
        self.time_base = stream.time_base
        self.start = stream.start_time or 0
        self.by_pts = bool(self.fps and self.time_base)  # False: indices by counting, never seeking
        self.seeked = False
        self.gop = 0  # the longest keyframe distance seen: seeking closer than this re-decodes frames
        self.counted = 0
        self.run: Iterator[Any] = container.decode(stream)

    def seek(self, target: int | None) -> None:
        """Decode from the keyframe at or before ``target``; None: from the first frame, counting."""
        if target is None:
            self.container.seek(0)
            self.by_pts = False
        else:
            offset = self.start + int(target / self.fps / self.time_base)
            self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
            self.seeked = True
        self.counted = 0
        self.run = self.container.decode(self.stream)

    def next(self) -> tuple[int | None, Any] | None:
        """(index, frame) of the next frame, index None when it cannot be known; None at the end."""
        frame = next(self.run, None)
        if frame is None:
            return None
        self.counted += 1
        if not self.by_pts:
            return self.counted - 1, frame
        if frame.pts is None:
            return None if self.seeked else self.counted - 1, frame
        return int(round(float((frame.pts - self.start) * self.time_base) * self.fps)), frame


def _decode(container: Any, stream: Any, targets: list[int]) -> dict[int, Image.Image]:
    """``targets`` (sorted, unique) -> their frames; up to ``_PAST_END`` past the last frame get the last frame."""
    reader = _Frames(container, stream)
    found: dict[int, Image.Image] = {}
    last, last_key, pos, k = None, None, -1, 0
    while k < len(targets):
        target = targets[k]
        fresh = reader.by_pts and target - max(pos, 0) > max(reader.gop, 1)
        if fresh:
            reader.seek(target)
        step = reader.next()
        if step is None:
            break
        idx, frame = step
        if idx is None or (fresh and idx > target):  # no timestamps after a seek, or a seek past the target
            reader.seek(None)
            pos = -1
            continue
        if fresh:
            reader.gop, last_key = max(reader.gop, target - idx), None
        if frame.key_frame:
            if last_key is not None and idx > last_key:
                reader.gop = max(reader.gop, idx - last_key)
            last_key = idx
        pos, last = idx, frame
        image = None
        while k < len(targets) and targets[k] <= idx:
            image = image or frame.to_image().convert("RGB")
            found[targets[k]] = image
            k += 1
    if k < len(targets) and last is not None:  # past the last frame: a header that counts a frame or two more
        if targets[-1] > pos + _PAST_END:
            raise VideoError(f"frame {targets[-1]} is past the end: {pos + 1} frames decode (a truncated file?)")
        image = last.to_image().convert("RGB")
        found.update({t: image for t in targets[k:]})
    return found


def load_frames(path: str | os.PathLike, indices: Sequence[int]) -> list[Image.Image]:
    """The frames at ``indices`` (0-based, in any order, repeats allowed) as RGB PIL images, decoding from the
    keyframe before each far-away frame rather than the whole video; an index one or two past the end (a header's
    rounded count) gives the last frame. ``VideoError`` naming the file when it cannot be read, no frame decodes,
    or an index is further past the end (a truncated file)."""
    name = _name(path)
    wanted = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or i < 0:
            raise InputError(f"frame indices must be non-negative integers, got {i!r}")
        wanted.append(int(i))
    if not wanted:
        return []
    container = _open(path)
    try:
        stream = _video_stream(container, name)
        stream.thread_type = "AUTO"
        found = _decode(container, stream, sorted(set(wanted)))
    except VideoError as e:
        raise VideoError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
    except _decode_errors() as e:
        raise VideoError(f"{name}: cannot decode the video ({_reason(e)})") from None
    finally:
        container.close()
    if any(found.get(i) is None for i in wanted):
        raise VideoError(f"{name}: no video frame could be decoded")
    return [found[i] for i in wanted]


# ---------------------------------------------------------------------------------------------------- prompt


def timestamp_text(seconds: float) -> str:
    """``[MM:SS]`` as the original writes it: ``int(ts) // 60`` and ``int(ts) % 60``, two digits each."""
    whole = int(seconds)
    return f"[{whole // 60:02d}:{whole % 60:02d}]"


def video_content(timestamps: Sequence[float] | None, num_frames: int | None = None) -> list[dict[str, Any]]:
    """A video's chat content items: per frame ``[MM:SS]`` text, an image item and ``"\\n"``; without timestamps
    (``timestamps=None`` and ``num_frames`` images) all the image items, then one ``"\\n"``."""
    if timestamps is None:
        count = _positive_int(num_frames, "num_frames")
        return [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": "\n"}]
    if num_frames is not None and num_frames != len(timestamps):
        raise InputError(f"num_frames={num_frames} but {len(timestamps)} timestamps")
    items: list[dict[str, Any]] = []
    for ts in timestamps:
        items += [{"type": "text", "text": timestamp_text(ts)}, {"type": "image"}, {"type": "text", "text": "\n"}]
    return items


def load_video(
    path: str | os.PathLike,
    num_frames: int | None = DEFAULT_NUM_FRAMES,
    fps: float | None = None,
    max_frames: int | None = None,
) -> Video:
    """Sample and decode a video file: ``num_frames`` frames at segment centres, or with ``fps`` that many frames
    per second of video (``num_frames`` then ignored), at most ``max_frames``; timestamps ``index / fps``."""
    info = probe(path)
    indices = sample_indices(info.frames, None if fps is not None else num_frames, fps=fps, video_fps=info.fps,
                             max_frames=max_frames)
    frames = load_frames(path, indices)
    return Video(frames=frames, indices=indices, timestamps=[i / info.fps for i in indices], info=info,
                 path=_name(path))


def as_video(video: Any, num_frames: int | None = DEFAULT_NUM_FRAMES, fps: float | None = None,
             max_frames: int | None = None) -> Video:
    """A ``Video`` from a file path (loaded), a ``Video`` (as it is) or a list of frames (PIL images or
    arrays; no timestamps, so the plain form)."""
    if isinstance(video, Video):
        return video
    if isinstance(video, str | os.PathLike):
        return load_video(video, num_frames=num_frames, fps=fps, max_frames=max_frames)
    if isinstance(video, Sequence) and not isinstance(video, str | bytes) and len(video) > 0:
        frames = [f if isinstance(f, Image.Image) else _array_frame(f) for f in video]
        return Video(frames=frames, indices=list(range(len(frames))), timestamps=None)
    raise InputError(f"a video must be a file path or a non-empty list of frames (PIL images), got "
                     f"{type(video).__name__}")


def _array_frame(frame: Any) -> Image.Image:
    if isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] in (3, 4) and frame.dtype == np.uint8:
        return Image.fromarray(frame).convert("RGB")
    raise InputError(f"a video frame must be a PIL image or an (H, W, 3) uint8 array, got {type(frame).__name__}")


# ---------------------------------------------------------------------------------------------------- messages

_PATH_KEYS = ("path", "video")  # a video item may name its file itself: {"type": "video", "path": "clip.mp4"}


def _is_video_item(item: Any) -> bool:
    return isinstance(item, Mapping) and item.get("type") == "video"


def _own_path(item: Mapping) -> Any:
    return next((item[k] for k in _PATH_KEYS if isinstance(item.get(k), str | os.PathLike)), None)


def has_video_items(messages: Sequence[Any]) -> bool:
    """Whether any message has a ``{"type": "video"}`` content item."""
    return any(isinstance(m, Mapping) and isinstance(m.get("content"), list)
               and any(_is_video_item(item) for item in m["content"]) for m in messages)


def expand_videos(
    messages: Sequence[Any],
    images: Sequence[Any] | None = None,
    videos: Sequence[Any] | None = None,
    *,
    timestamps: bool = True,
    num_frames: int | None = DEFAULT_NUM_FRAMES,
    fps: float | None = None,
    max_frames: int | None = None,
) -> tuple[list[Any], list[Any]]:
    """``messages`` with every ``{"type": "video"}`` item expanded into its frames' items (``video_content``:
    ``[MM:SS]``, image, ``"\n"`` per frame; ``timestamps=False`` or frames without timestamps: the plain form),
    and the images in the order of the image items: ``images`` for the image items, each video's frames for its
    own. A video item takes the next of ``videos`` (a file path, a ``Video`` or a list of frames) unless it names
    its file (``"path"`` or ``"video"`` key); files load with ``load_video(num_frames, fps, max_frames)``."""
    images, videos = list(images or []), list(videos or [])
    items = [item for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list)
             for item in m["content"]]
    want_images = sum(isinstance(item, Mapping) and item.get("type") == "image" for item in items)
    want_videos = sum(_is_video_item(item) and _own_path(item) is None for item in items)
    if want_images != len(images):
        raise InputError(f"{len(images)} image(s) given but the messages have {want_images} image item(s)")
    if want_videos != len(videos):
        raise InputError(f"{len(videos)} video(s) given but the messages have {want_videos} video item(s) without "
                         "a path")
    out_messages: list[Any] = []
    out_images: list[Any] = []
    n_image = n_video = 0
    for message in messages:
        if not (isinstance(message, Mapping) and isinstance(message.get("content"), list)):
            out_messages.append(message)
            continue
        content: list[Any] = []
        for item in message["content"]:
            if isinstance(item, Mapping) and item.get("type") == "image":
                out_images.append(images[n_image])
                n_image += 1
                content.append(item)
            elif _is_video_item(item):
                source = _own_path(item)
                if source is None:
                    source = videos[n_video]
                    n_video += 1
                video = as_video(source, num_frames=num_frames, fps=fps, max_frames=max_frames)
                content += video.content(timestamps=timestamps)
                out_images += video.frames
            else:
                content.append(item)
        out_messages.append({**message, "content": content})
    return out_messages, out_images


__all__ = ["DEFAULT_NUM_FRAMES", "VIDEO_IMAGE_SIZE", "Video", "VideoError", "VideoInfo", "as_video", "expand_videos",
           "has_video_items", "load_frames", "load_video", "probe", "sample_indices", "timestamp_text", "video_content"]
