"""Images of ``image_url`` content parts: ``data:`` URLs always; local files (a path or ``file://``) only under the
server's ``--allowed-media-dir``; ``http(s)://`` only with ``--allow-remote-media``. Every failure is a
``MediaError`` naming the part."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import urllib.parse
import urllib.request

from PIL import Image, ImageOps

from aria_jax.errors import InputError
from aria_jax.inference.image_processor import load_image

MAX_MEDIA_BYTES = 20 << 20  # a remote image larger than this is refused


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
            return decode_image(_data_url(url), "data URL")
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


def _data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise InputError("a data URL must be data:<type>;base64,<data>")
    if not header[5:].startswith("image/"):
        raise InputError(f"data URL of type {header[5:].split(';')[0]!r}, not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("data URL: invalid base64") from None


def _local_path(url: str, policy: MediaPolicy) -> str:
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
    if policy.allowed_dir is None:
        raise InputError("local image files are off (start the server with --allowed-media-dir DIR)")
    real, root = os.path.realpath(path), os.path.realpath(policy.allowed_dir)
    if os.path.commonpath([real, root]) != root:
        raise InputError(f"{path}: not under the allowed media directory")
    return real


def _fetch(url: str, timeout_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) only, checked)
            data = response.read(MAX_MEDIA_BYTES + 1)
    except (OSError, ValueError) as e:
        raise InputError(f"{url}: cannot fetch ({e})") from None
    if len(data) > MAX_MEDIA_BYTES:
        raise InputError(f"{url}: larger than {MAX_MEDIA_BYTES >> 20} MiB")
    return data
