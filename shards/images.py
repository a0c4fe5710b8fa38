"""Image I/O for sharding: cheap size from the file header, OpenCV reduced (DCT-scaled) JPEG
decode, area resize of the long side to `max_size`, 16-bit windowing, single-channel JPEG encode.

Corrupt JPEG data (garbage in the entropy-coded data, a file truncated and re-terminated) decodes
in libjpeg with a *warning* only, and OpenCV returns the half-grey image without saying so.
libjpeg prints its first warning per image on the C `stderr` (OpenCV installs no message hook),
so `decode_resize` points file descriptor 2 at a per-process scratch file for the duration of
the decode and skips the image (`corrupt_image`) when libjpeg reported corrupt data there. The
redirection is a few system calls per image (measured: no difference next to the ~25 ms decode
of a 3000x2500 JPEG at 1/4 scale); it is process-wide, which is harmless in the single-threaded
sharding workers.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from cxrfast.shards.pixel_stats import window_16bit

#: libjpeg DCT scaling factors OpenCV exposes, largest first.
_REDUCED_FLAGS: tuple[tuple[int, int], ...] = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (baseline, extended, progressive, lossless, ...), not DHT/JPG/DAC.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: libjpeg warnings that mean the pixels are not the encoded image ("Corrupt JPEG data: premature
#: end of data segment", "... N extraneous bytes before marker", "... bad Huffman code",
#: "Premature end of JPEG file").
_CORRUPT_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is the skipped.jsonl reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Decoded:
    """A resized 8-bit image and what we learned about its source."""

    image: np.ndarray  # uint8 [H, W], long side <= max_size
    orig_width: int
    orig_height: int
    reduction: int  # libjpeg DCT scale used (1 = full decode)
    source_format: str  # "jpeg" | "png16" | "png8" | "other" | "dicom"


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF segment, or None if the header cannot be parsed."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return (width, height) if width and height else None
        if marker == 0xDA:  # start of scan before any SOF: malformed
            return None
        i += 2 + length
    return None


def png_info(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, bit depth) from a PNG's IHDR chunk, or None."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height, data[24]


def reduction_for(width: int, height: int, max_size: int) -> int:
    """Largest libjpeg scale 1/r (r in 8, 4, 2) whose decoded long side is still >= max_size."""
    long_side = max(width, height)
    for r, _ in _REDUCED_FLAGS:
        if -(-long_side // r) >= max_size:
            return r
    return 1


def target_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) with the long side at most max_size, aspect kept (never upscaled)."""
    long_side = max(width, height)
    if long_side <= max_size:
        return width, height
    scale = max_size / long_side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_gray8(img: np.ndarray) -> tuple[np.ndarray, str]:
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            img = img[:, :, 0]
    if img.dtype == np.uint16:
        return window_16bit(img), "png16"
    if img.dtype != np.uint8:
        raise ImageError("undecodable_image", f"unsupported pixel type {img.dtype}")
    return img, "png8"


_SCRATCH: dict[int, IO[bytes]] = {}  # pid -> the scratch file fd 2 points at while decoding


@contextmanager
def _native_stderr() -> Iterator[IO[bytes]]:
    """Point file descriptor 2 at this process's (emptied) scratch file inside the block; the
    yielded file holds what native code wrote there."""
    f = _SCRATCH.get(os.getpid())
    if f is None:
        f = _SCRATCH[os.getpid()] = tempfile.TemporaryFile()
    f.seek(0)
    f.truncate()
    saved = os.dup(2)
    os.dup2(f.fileno(), 2)
    try:
        yield f
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _written(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read(4096).decode("utf-8", "replace")


def decode_resize(data: bytes, max_size: int, *, name: str = "<bytes>") -> Decoded:
    """Decode an X-ray file's bytes to an 8-bit grayscale image with long side <= max_size.

    JPEGs are decoded with libjpeg's DCT scaling (the largest 1/r that keeps the long side >=
    max_size), then area-resized; PNGs (8 or 16 bit) are decoded fully, 16-bit ones windowed.
    Raises ImageError("undecodable_image", ...) for anything OpenCV cannot decode and
    ImageError("corrupt_image", ...) for a JPEG that libjpeg decoded with a corrupt-data warning.
    """
    if not data:
        raise ImageError("undecodable_image", f"{name}: empty file")
    try:
        return _decode_resize(data, max_size, name)
    except cv2.error as e:
        raise ImageError("undecodable_image", f"{name}: OpenCV error {e.msg if hasattr(e, 'msg') else e}") from None


def _decode_resize(data: bytes, max_size: int, name: str) -> Decoded:
    buf = np.frombuffer(data, dtype=np.uint8)
    size = jpeg_size(data)
    if size is not None:
        width, height = size
        if data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
            raise ImageError("undecodable_image", f"{name}: no JPEG end-of-image marker (truncated file?)")
        r = reduction_for(width, height, max_size)
        flag = dict(_REDUCED_FLAGS).get(r, cv2.IMREAD_GRAYSCALE)
        with _native_stderr() as err:
            img = cv2.imdecode(buf, flag)
        said = _written(err)
        if any(w in said for w in _CORRUPT_WARNINGS):
            raise ImageError("corrupt_image", f"{name}: libjpeg: {' '.join(said.split())}")
        if img is None:
            raise ImageError("undecodable_image", f"{name}: OpenCV could not decode the JPEG")
        if img.shape != (-(-height // r), -(-width // r)):
            raise ImageError(
                "undecodable_image", f"{name}: decoded shape {img.shape} does not match header {width}x{height} / {r}"
            )
        fmt = "jpeg"
    else:
        info = png_info(data)
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED if info is not None else cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ImageError("undecodable_image", f"{name}: OpenCV could not decode the file (not a JPEG/PNG?)")
        height, width = img.shape[:2]
        r = 1
        img, fmt = _to_gray8(img)
        if info is None:
            fmt = "other"
    tw, th = target_size(width, height, max_size)
    if (img.shape[1], img.shape[0]) != (tw, th):
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    return Decoded(np.ascontiguousarray(img), width, height, r, fmt)


def load_resize(path: Path, max_size: int) -> Decoded:
    """`decode_resize` of a file (`cxrfast.shards.dicom.decode_dicom` of a `.dcm` file); a missing
    file raises ImageError("missing_image", ...)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError("missing_image", f"{path} does not exist") from None
    except OSError as e:
        raise ImageError("unreadable_image", f"{path}: {e}") from None
    if path.suffix.lower() == ".dcm":
        from cxrfast.shards.dicom import decode_dicom  # (it imports this module)

        return decode_dicom(data, max_size, name=str(path))
    return decode_resize(data, max_size, name=str(path))


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """Single-channel baseline JPEG (deterministic for the same pixels and quality)."""
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {img.dtype} {img.shape}")
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {img.shape} JPEG")
    return enc.tobytes()
