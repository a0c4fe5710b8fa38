"""DICOM for sharding: pydicom parses the file and computes the display transform, OpenCV decodes
and resizes.

A stored value becomes an 8-bit display value through, in order: the Modality LUT (rescale
slope/intercept or a Modality LUT Sequence, pydicom's `apply_modality_lut`), the VOI LUT (a VOI
LUT Sequence or WindowCenter/Width, pydicom's `apply_voi_lut`), scaling of the VOI output range
to 0..255, and inversion for MONOCHROME1. The transform depends on the stored value only, so it is
computed once per file as a lookup table over every possible stored value and applied to the
pixels in one pass. Without a VOI, 8-bit images keep their range (scaled through the modality
LUT) and deeper ones get the same percentile window as 16-bit PNGs.

JPEG Baseline frames (8-bit, as the RSNA challenge ships its DICOMs) are decoded by OpenCV with
libjpeg's DCT scaling, like the JPEG sources of the other datasets; the lookup table is applied
to the decoded (reduced, then area-resized) pixels. Every other transfer syntax goes through
pydicom's `pixel_array` (uncompressed natively; compressed ones need pydicom's decoder plugins).
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import cv2
import numpy as np

from cxrfast.shards.images import Decoded, ImageError, decode_resize, target_size
from cxrfast.shards.pixel_stats import window_16bit

#: Transfer syntaxes whose 8-bit frames OpenCV decodes (JPEG Baseline, JPEG Extended).
_OPENCV_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*[Yy]?\s*$")


def parse_age(value: object) -> int | None:
    """`51`, `051Y` (the AS VR) -> 51; blank or anything else (months, days, junk) -> None."""
    m = _AGE_RE.match(str(value or ""))
    return int(m.group(1)) if m else None


def read_header(path: Path) -> dict | None:
    """{"view", "sex", "age"} from a DICOM's header (pixels not read), or None when the file is
    missing or not cleanly readable as DICOM, e.g. truncated, without Rows/Columns (the image stage
    then skips it with the reason)."""
    from pydicom import config, dcmread

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with config.disable_value_validation():
                tags = ["ViewPosition", "PatientSex", "PatientAge", "Rows", "Columns"]
                ds = dcmread(path, stop_before_pixels=True, specific_tags=tags)
                if not ds.get("Rows") or not ds.get("Columns"):  # cut short (pydicom reads what is there)
                    return None
                header = {
                    "view": str(ds.get("ViewPosition", "") or "").strip().upper(),
                    "sex": str(ds.get("PatientSex", "") or "").strip().upper()[:1],
                    "age": parse_age(ds.get("PatientAge", "")),
                }
        except Exception:  # noqa: BLE001 -- any unreadable header: the image stage reports why
            return None
    return None if caught else header


def _stored_range(ds) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _has_voi(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    lut = bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None
    return lut or ("WindowCenter" in ds and "WindowWidth" in ds)


def display_lut(ds) -> np.ndarray:
    """uint8 display value of every stored value lo..hi (see the module doc), indexed by value - lo.

    Only for images whose display does not depend on their content: 8-bit ones, or any with a
    VOI LUT / window."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    lo, hi = _stored_range(ds)
    stored = np.arange(lo, hi + 1, dtype=np.int64)
    values = apply_modality_lut(stored, ds)
    if _has_voi(ds):
        if ds.get("VOILUTSequence") and ds.VOILUTSequence[0].get("LUTData") is not None:
            values = np.rint(values).astype(np.int64)  # a LUT is indexed by integers
            desc = ds.VOILUTSequence[0].LUTDescriptor
            out_lo, out_hi = 0.0, float(2 ** int(desc[2]) - 1)
            values = apply_voi_lut(values, ds, prefer_lut=True)
        else:
            # the window's output range: pydicom maps values beyond the window to its ends
            with np.errstate(over="ignore"):
                ends = apply_voi_lut(np.array([-1e300, 1e300]), ds, prefer_lut=True)
            out_lo, out_hi = float(ends[0]), float(ends[1])
            values = apply_voi_lut(values, ds, prefer_lut=True)
    else:
        out_lo, out_hi = float(np.min(values)), float(np.max(values))
    span = out_hi - out_lo
    norm = (np.asarray(values, dtype=np.float64) - out_lo) / (span if span > 0 else 1.0)
    norm = np.clip(norm, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        norm = 1.0 - norm
    return np.floor(norm * 255.0 + 0.5).astype(np.uint8)


def _check(ds, name: str) -> None:
    if "PixelData" not in ds:
        raise ImageError("undecodable_image", f"{name}: DICOM without pixel data")
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if pi not in _MONOCHROME or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageError("unsupported_image", f"{name}: PhotometricInterpretation {pi!r} with "
                         f"{ds.get('SamplesPerPixel')} samples per pixel; expected MONOCHROME1/2, 1 sample")  # fmt: skip
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ImageError("unsupported_image", f"{name}: {ds.NumberOfFrames} frames; expected one")
    for key in ("Rows", "Columns", "BitsAllocated", "BitsStored"):
        if not ds.get(key):
            raise ImageError("undecodable_image", f"{name}: DICOM header lacks {key}")


def _decode(ds, data_name: str, max_size: int) -> Decoded:
    rows, cols = int(ds.Rows), int(ds.Columns)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts in _OPENCV_JPEG and int(ds.BitsStored) <= 8:
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        dec = decode_resize(frame, max_size, name=data_name)
        if (dec.orig_width, dec.orig_height) != (cols, rows):
            raise ImageError("undecodable_image", f"{data_name}: JPEG frame is {dec.orig_width}x{dec.orig_height}, "
                             f"the header says Columns {cols} x Rows {rows}")  # fmt: skip
        lut = display_lut(ds)
        img = dec.image if np.array_equal(lut, np.arange(256)) else cv2.LUT(dec.image, lut)
        return Decoded(img, cols, rows, dec.reduction, "dicom")
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:  # no decoder plugin for this transfer syntax
        raise ImageError("unsupported_image", f"{data_name}: cannot decode transfer syntax {ts} ({e})") from None
    if arr.shape != (rows, cols):
        raise ImageError("undecodable_image", f"{data_name}: pixel array {arr.shape}, header Rows {rows} x Columns {cols}")
    lo, hi = _stored_range(ds)
    arr = np.clip(arr.astype(np.int64, copy=False), lo, hi)
    if _has_voi(ds) or int(ds.BitsStored) <= 8:
        img = display_lut(ds)[arr - lo]
    else:  # deep image without a VOI: the percentile window of 16-bit PNGs
        img = window_16bit((arr - lo).astype(np.uint16))
        slope = float(ds.get("RescaleSlope", 1) or 1)
        if (ds.PhotometricInterpretation == "MONOCHROME1") != (slope < 0):
            img = 255 - img
    tw, th = target_size(cols, rows, max_size)
    if (tw, th) != (cols, rows):
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    return Decoded(np.ascontiguousarray(img), cols, rows, 1, "dicom")


def decode_dicom(data: bytes, max_size: int, *, name: str = "<bytes>") -> Decoded:
    """A DICOM file's bytes -> 8-bit grayscale with long side <= max_size (see the module doc).

    Raises ImageError: "undecodable_image" (not DICOM, truncated, corrupt pixel data),
    "unsupported_image" (colour, several frames, a transfer syntax without a decoder).
    """
    from pydicom import config, dcmread

    if not data:
        raise ImageError("undecodable_image", f"{name}: empty file")
    with warnings.catch_warnings(record=True) as caught:  # e.g. a truncated file: pydicom warns, drops the rest
        warnings.simplefilter("always")
        try:
            with config.disable_value_validation():
                ds = dcmread(io.BytesIO(data))
                _check(ds, name)
                return _decode(ds, name, max_size)
        except ImageError as e:
            said = "; ".join(dict.fromkeys(str(w.message) for w in caught))
            raise ImageError(e.reason, e.detail + (f" (pydicom: {said})" if said else "")) from None
        except cv2.error as e:
            raise ImageError("undecodable_image", f"{name}: OpenCV error {e}") from None
        except Exception as e:  # noqa: BLE001 -- pydicom raises many types for corrupt files; each is a skip reason
            raise ImageError("undecodable_image", f"{name}: not a readable DICOM ({type(e).__name__}: {e})") from None
