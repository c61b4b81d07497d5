"""Images of ``image_url`` and videos of ``video_url`` content parts: ``data:`` URLs always; local files (a path or
``file://``) only under the server's ``--allowed-media-dir``; ``http(s)://`` only with ``--allow-remote-media``.
Every failure is a ``MediaError`` naming the part."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import tempfile
import urllib.parse
import urllib.request

from PIL import Image, ImageOps

from aria_jax.errors import InputError
from aria_jax.inference import video as video_io
from aria_jax.inference.image_processor import load_image

MAX_MEDIA_BYTES = 20 << 20  # a remote image larger than this is refused
MAX_VIDEO_BYTES = 256 << 20  # a remote video larger than this is refused
VIDEO_SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv"}


class MediaError(InputError):
    """An image part that cannot be used; ``param`` names it (``messages[0].content[1].image_url``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    allowed_dir: str | None = None  # local files only under this directory (realpath), none when None
    allow_remote: bool = False
    timeout_s: float = 10.0


def decode_image(data: bytes, what: str) -> Image.Image:
    """Image bytes -> an RGB PIL image as ``load_image`` opens files (EXIF transpose, then RGB)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{what}: cannot read image ({type(e).__name__}: {e})") from None


def load(url: str, policy: MediaPolicy, param: str) -> Image.Image:
    """The image an ``image_url`` names, by ``policy``."""
    try:
        if url.startswith("data:"):
            return decode_image(_data_url(url, "image"), "data URL")
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            if not policy.allow_remote:
                raise InputError("remote images are off (start the server with --allow-remote-media)")
            return decode_image(_fetch(url, policy.timeout_s), url)
        if scheme == "file" or os.path.isabs(url):
            return load_image(_local_path(url, policy))
        raise InputError(f"unsupported image URL {url[:64]!r} (use a data: URL, a file under the server's "
                         "--allowed-media-dir, or http(s) with --allow-remote-media)")
    except InputError as e:
        raise MediaError(str(e).splitlines()[0], param) from None


def load_video(url: str, policy: MediaPolicy, param: str, num_frames: int) -> video_io.Video:
    """The video a ``video_url`` names, by ``policy``: ``num_frames`` frames sampled at segment centres and decoded
    (PyAV), with their timestamps, as ``Aria.chat`` samples a video file. Bytes (a data URL, a download) go through a
    temporary file that is removed at once."""
    try:
        if url.startswith("data:"):
            kind = url[5:].partition(",")[0].split(";")[0]
            return _video_from_bytes(_data_url(url, "video"), VIDEO_SUFFIXES.get(kind, ".mp4"), num_frames)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            if not policy.allow_remote:
                raise InputError("remote videos are off (start the server with --allow-remote-media)")
            suffix = os.path.splitext(urllib.parse.urlsplit(url).path)[1] or ".mp4"
            return _video_from_bytes(_fetch(url, policy.timeout_s, MAX_VIDEO_BYTES), suffix, num_frames)
        if scheme == "file" or os.path.isabs(url):
            return video_io.load_video(_local_path(url, policy), num_frames=num_frames)
        raise InputError(f"unsupported video URL {url[:64]!r} (use a data: URL, a file under the server's "
                         "--allowed-media-dir, or http(s) with --allow-remote-media)")
    except InputError as e:
        raise MediaError(str(e).splitlines()[0], param) from None


def _video_from_bytes(data: bytes, suffix: str, num_frames: int) -> video_io.Video:
    fd, path = tempfile.mkstemp(prefix="aria-jax-video-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        loaded = video_io.load_video(path, num_frames=num_frames)
    except InputError as e:  # name the part, not the temporary file
        raise InputError(str(e).replace(path, "the video's bytes")) from None
    finally:
        os.unlink(path)
    return dataclasses.replace(loaded, path="video_url")


def _data_url(url: str, kind: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise InputError("a data URL must be data:<type>;base64,<data>")
    if not header[5:].startswith(f"{kind}/"):
        raise InputError(f"data URL of type {header[5:].split(';')[0]!r}, not {'an' if kind == 'image' else 'a'} "
                         f"{kind}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("data URL: invalid base64") from None


def _local_path(url: str, policy: MediaPolicy) -> str:
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
    if policy.allowed_dir is None:
        raise InputError("local media files are off (start the server with --allowed-media-dir DIR)")
    real, root = os.path.realpath(path), os.path.realpath(policy.allowed_dir)
    if os.path.commonpath([real, root]) != root:
        raise InputError(f"{path}: not under the allowed media directory")
    return real


def _fetch(url: str, timeout_s: float, limit: int = MAX_MEDIA_BYTES) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) only, checked)
            data = response.read(limit + 1)
    except (OSError, ValueError) as e:
        raise InputError(f"{url}: cannot fetch ({e})") from None
    if len(data) > limit:
        raise InputError(f"{url}: larger than {limit >> 20} MiB")
    return data
