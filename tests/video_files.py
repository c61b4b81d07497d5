"""Small test videos written with PyAV: frame i shows i in binary (8 black/white stripes), so a decoded frame says
which frame it is, whatever the codec did to it."""

from __future__ import annotations

import os

import av
import numpy as np
from PIL import Image

WIDTH, HEIGHT, STRIPE = 128, 32, 16  # 8 stripes of 16 px: frame numbers 0..255


def _encodes(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
        return True
    except Exception:  # noqa: BLE001 - av.codec.codec.UnknownCodecError and friends
        return False


# (container extension, encoder): those this PyAV build can write
CONTAINERS = [(ext, codec) for ext, codec in [("mp4", "libx264"), ("mp4", "mpeg4"), ("avi", "mpeg4"),
                                              ("mkv", "libx264"), ("webm", "libvpx-vp9"), ("webm", "libvpx")]
              if _encodes(codec)]


def pattern(i: int) -> np.ndarray:
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for bit in range(8):
        if (i >> bit) & 1:
            frame[:, bit * STRIPE:(bit + 1) * STRIPE] = 255
    return frame


def frame_number(image: Image.Image) -> int:
    """The frame number a decoded ``pattern`` frame shows (the centre of each stripe, thresholded)."""
    gray = np.asarray(image.convert("L").resize((WIDTH, HEIGHT)), dtype=np.float32)
    return sum(1 << bit for bit in range(8) if gray[:, bit * STRIPE + 4:(bit + 1) * STRIPE - 4].mean() > 128)


def write_video(path: str | os.PathLike, frames: int, fps: int = 10, codec: str = "libx264", gop: int = 12,
                audio_seconds: float = 0.0) -> str:
    """``frames`` pattern frames at ``fps``, a keyframe at least every ``gop`` frames; with ``audio_seconds`` also
    a silent PCM audio track that long (mkv, avi)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"g": str(gop)}
        audio = container.add_stream("pcm_s16le", rate=8000) if audio_seconds else None
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pattern(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        for start in range(0, int(audio_seconds * 8000), 800):
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = 8000, start
            for packet in audio.encode(chunk):
                container.mux(packet)
    return str(path)


def write_zero_frame_video(path: str | os.PathLike, codec: str = "mpeg4") -> str:
    """A container with its header written and no frame in it."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
    return str(path)


def all_frames(path: str | os.PathLike) -> list[Image.Image]:
    """Every frame, decoded front to back with PyAV (the reference the seeking loader is held against)."""
    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]
