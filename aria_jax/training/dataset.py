"""Fine-tuning datasets in the original Aria JSONL format, read and checked before step 0.

``DIR/train.jsonl``, one sample per line: ``{"messages": [{"role": "user"|"assistant"|"system", "content": [{"type":
"text", "text": ...}, {"type": "image"}]}], "images": ["relative/path.png", ...]}`` (``images`` in the order of
the image items; text-only samples have none). A video sample instead has ``"video": {"path": "videos/x.mp4",
"num_frames": 8}`` (8 when absent or null) and one ``{"type": "video"}`` item in a user message, which the encoder
(``aria_jax.training.data``) expands into the sampled frames with their timestamps. ``dataset_mixer`` weights mix
several datasets.

Bad data never ends a run with a traceback: a malformed line is a ``RecipeError`` naming ``file:line`` when the
datasets are read, and every referenced image and video is checked from its header before step 0 (``check_images``: a
``RecipeError``, or with ``skip_bad_samples`` the sample is left out and counted).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from aria_jax.errors import ImageError, one_line
from aria_jax.files import parse_json
from aria_jax.inference.image_processor import image_size
from aria_jax.inference.video import VideoError, VideoInfo, probe
from aria_jax.training.config import RecipeError, show

DEFAULT_FRAMES = 8  # the original's num_frames when a sample gives none
MAX_FRAMES = 4096  # frames per video sample: far beyond any context (128 tokens each), and a bound on the plan


@dataclasses.dataclass(frozen=True)
class VideoRef:
    path: str  # absolute, checked to exist inside the dataset directory
    num_frames: int  # frames to sample (``aria_jax.inference.video.sample_indices``)


@dataclasses.dataclass
class Record:
    messages: list[dict]
    images: list[str]  # absolute paths, checked to exist inside the dataset directory
    where: str  # "file:line" for messages
    video: VideoRef | None = None  # a video sample: its one {"type": "video"} item becomes the sampled frames

    @property
    def media(self) -> list[str]:
        """Every file the sample reads: its images, or its video."""
        return self.images + ([self.video.path] if self.video is not None else [])


def items_of(messages: list[dict], kind: str) -> int:
    """How many content items of type ``kind`` (``image``, ``video``) the messages hold."""
    return sum(
        1 for m in messages if isinstance(m.get("content"), list)
        for item in m["content"] if isinstance(item, dict) and item.get("type") == kind
    )


def image_items(messages: list[dict]) -> int:
    return items_of(messages, "image")


ROLES = ("user", "assistant", "system")


def _check_text(value: str, where: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecipeError(f"{where}: {what} is not valid Unicode text (a lone surrogate escape)") from None


def _check_message(m: dict, where: str) -> None:
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise RecipeError(f"{where}: unknown role {show(role)} (expected one of {', '.join(ROLES)})")
    content = m.get("content")
    if isinstance(content, str):
        _check_text(content, where, "message content")
        return
    if not isinstance(content, list):
        raise RecipeError(f"{where}: message content must be a list of items or a string")
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            _check_text(item["text"], where, "a text item")
        elif kind not in ("image", "video"):
            raise RecipeError(f"{where}: content item {show(item)}: expected {{'type': 'text', 'text': STRING}}, "
                              "{'type': 'image'} or {'type': 'video'}")


def parse_line(line: bytes | str, root: str, where: str) -> Record:
    """One JSONL line (``where``: ``file:line``) -> a Record; every problem is a RecipeError naming ``where``."""
    obj = parse_json(line, where, error=RecipeError)
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RecipeError(f"{where}: 'messages' must be a non-empty list of messages")
    for m in messages:
        _check_message(m, where)
    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecipeError(f"{where}: 'images' must be a list of paths")
    if len(images) != image_items(messages):
        raise RecipeError(f"{where}: {image_items(messages)} image item(s) but {len(images)} path(s) in 'images'")
    video = _video(obj.get("video"), messages, bool(images), root, where)  # "video": null (the original's): none
    return Record(messages, [_media_path(root, rel, where) for rel in images], where, video)


def _video(value: Any, messages: list[dict], has_images: bool, root: str, where: str) -> VideoRef | None:
    """A line's ``video`` (None for null or absent): ``{"path": RELATIVE, "num_frames": N}`` with exactly one
    ``{"type": "video"}`` item, in a user message, and no images (as the original refuses both in one sample)."""
    items = items_of(messages, "video")
    if value is None:
        if items:
            raise RecipeError(f"{where}: {items} video item(s) but no 'video' (expected \"video\": {{\"path\": "
                              "PATH, \"num_frames\": N}})")
        return None
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise RecipeError(f"{where}: 'video' must be {{\"path\": PATH, \"num_frames\": N}} or null, not "
                          f"{show(value)}")
    frames = value.get("num_frames")
    frames = DEFAULT_FRAMES if frames is None else frames
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise RecipeError(f"{where}: video num_frames {show(frames)} is not a whole number in 1..{MAX_FRAMES}")
    if has_images:
        raise RecipeError(f"{where}: a sample has 'images' or a 'video', not both (as the original)")
    in_user = sum(items_of([m], "video") for m in messages if m.get("role") == "user")
    if items != 1 or in_user != 1:
        raise RecipeError(f"{where}: a 'video' needs exactly one {{'type': 'video'}} item, in a user message "
                          f"({items} found{'' if in_user == items else ' outside user messages'})")
    return VideoRef(_media_path(root, value["path"], where, "video"), frames)


def _media_path(root: str, rel: str, where: str, what: str = "image") -> str:
    """The absolute path of an image or video named in a line, which must stay inside the dataset directory and
    exist."""
    if not rel or "\0" in rel:
        raise RecipeError(f"{where}: {what} path {show(rel)} is not a file name")
    _check_text(rel, where, f"a {what} path")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.isabs(rel) or os.path.commonpath([real_root, path]) != real_root:
        raise RecipeError(f"{where}: {what} path {rel!r} escapes the dataset directory")
    if not os.path.isfile(path):
        raise RecipeError(f"{where}: {what} {rel!r} not found")
    return path


def read_jsonl(root: str, split: str = "train") -> list[Record]:
    """``root/<split>.jsonl``: one sample per non-blank line (bytes: non-UTF-8 text is one line naming file:line)."""
    path = os.path.join(root, f"{split}.jsonl")
    records = []
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    records.append(parse_line(line, root, f"{path}:{number}"))
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None
    if not records:
        raise RecipeError(f"{path}: no samples")
    return records


def mix(datasets: dict[str, list[Record]], weights: dict[str, float]) -> list[Record]:
    """dataset_mixer: weight <= 1 keeps that leading fraction (at least one sample), > 1 repeats the dataset
    int(weight) times, 0 skips it (as the original's ``int(0 * n)`` rows)."""
    out: list[Record] = []
    for name, records in datasets.items():
        w = weights[name]
        if w > 0:
            out.extend(records[: max(1, int(w * len(records)))] if w <= 1 else records * int(w))
    return out



def check_placeholders(records: list[Record], placeholder: str) -> None:
    """No text may contain the image placeholder itself (images are ``{"type": "image"}`` items): such a sample
    would fail only when encoded, mid-run. Checked before step 0, naming the first such line."""
    for record in records:
        for message in record.messages:
            content = message["content"]
            texts = [content] if isinstance(content, str) else [i["text"] for i in content if i["type"] == "text"]
            if any(placeholder in text for text in texts):
                raise RecipeError(f"{record.where}: a text contains the image placeholder {placeholder!r} (images "
                                  "are {'type': 'image'} items)")



def load_datasets(mixer: dict[str, Any], split: str = "train") -> list[Record]:
    """The training samples: every dataset's ``<split>.jsonl`` read and checked (a weight-0 one too, as the
    original reads it), mixed by weight."""
    return mix({p: read_jsonl(p, split) for p in mixer}, {p: float(w) for p, w in mixer.items()})


def load_eval_records(mixer: dict[str, Any], split: str = "test") -> tuple[list[Record], list[str]]:
    """The evaluation samples: every dataset's ``<split>.jsonl`` that exists (whatever its weight, as the
    original concatenates the test splits), and the files read."""
    files = [p for p in mixer if os.path.isfile(os.path.join(p, f"{split}.jsonl"))]
    return [r for p in files for r in read_jsonl(p, split)], [os.path.join(p, f"{split}.jsonl") for p in files]


def check_images(records: list[Record], skip_bad: bool, log: Callable[[str], None] = print, progress: bool = False
                 ) -> tuple[list[Record], int, dict[str, tuple[int, int] | VideoInfo]]:
    """Read every referenced image's and video's header once (``image_size``: no pixels decoded for most formats;
    ``probe``: the container header, no frame decoded), before step 0.

    Returns the records kept, how many were left out and the sizes: (width, height) per image, ``VideoInfo`` per
    video (for ``JsonlEncoder.measure``). A file that cannot be read is a RecipeError naming the first sample
    using it, or with ``skip_bad`` every sample using it is left out (one log line). The same files give the same
    decisions on every process.
    """

    paths = list(dict.fromkeys(p for r in records for p in r.media))
    videos = {r.video.path for r in records if r.video is not None}
    sizes: dict[str, tuple[int, int] | VideoInfo] = {}
    errors: dict[str, ImageError | VideoError] = {}
    for path in tqdm(paths, desc="checking images", unit="image", disable=not progress or len(paths) < 1000):
        try:
            sizes[path] = probe(path) if path in videos else image_size(path)
        except (ImageError, VideoError) as exc:
            errors[path] = exc
    if not errors:
        return records, 0, sizes
    kept, first = [], None
    for record in records:
        bad = next((p for p in record.media if p in errors), None)
        if bad is None:
            kept.append(record)
            continue
        first = first or f"{record.where}: {errors[bad]}"
        if not skip_bad:
            raise RecipeError(f"{first} (set skip_bad_samples: true to leave such samples out)")
    skipped = len(records) - len(kept)
    if not kept:
        raise RecipeError(f"every sample is dropped: all {skipped} have an unreadable image or video (the first: "
                          f"{first})")
    log(f"skip_bad_samples: left out {skipped} of {len(records)} samples with an unreadable image or video (the "
        f"first: {first})")
    return kept, skipped, sizes
