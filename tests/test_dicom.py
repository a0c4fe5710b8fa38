"""`cxrfast.shards.dicom`: the display transform (modality LUT, window, VOI LUT, MONOCHROME1),
JPEG Baseline frames through OpenCV, uncompressed pixels through pydicom, corrupt files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrfast.shards.dicom import decode_dicom, parse_age, read_header
from cxrfast.shards.images import ImageError, load_resize
from cxrfast.synth.rsna import encode_dicom, rsna_dataset

H, W = 120, 100


def _gradient(bits: int) -> np.ndarray:
    top = 255 if bits == 8 else 4000
    img = np.tile(np.linspace(10, top, W), (H, 1))
    return np.rint(img).astype(np.uint8 if bits == 8 else np.uint16)


def _decode(ds, max_size: int = 512) -> np.ndarray:
    dec = decode_dicom(encode_dicom(ds), max_size)
    assert (dec.orig_width, dec.orig_height) == (W, H) and dec.source_format == "dicom"
    return dec.image


def _window_reference(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) to 0..255."""
    c, w = center - 0.5, width - 1
    y = ((x - c) / w + 0.5) * 255
    return np.clip(np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, y)), 0, 255)


def test_monochrome2_jpeg_is_kept_and_monochrome1_is_inverted() -> None:
    img = _gradient(8)
    mono2 = _decode(rsna_dataset(img, encoding="jpeg8", patient_id="p"))
    mono1 = _decode(rsna_dataset(img, encoding="mono1_jpeg8", patient_id="p"))  # stores 255 - img
    assert np.abs(mono2.astype(int) - img).max() <= 3  # JPEG q95 of a smooth gradient
    assert np.abs(mono1.astype(int) - img).max() <= 3  # inverted back for display


def test_jpeg_frames_are_decoded_at_reduced_size() -> None:
    big = cv2.resize(_gradient(8), (800, 960))
    ds = rsna_dataset(big, encoding="jpeg8", patient_id="p")
    dec = decode_dicom(encode_dicom(ds), 200)
    assert dec.reduction == 4 and dec.image.shape == (200, 167) and (dec.orig_width, dec.orig_height) == (800, 960)


def test_16bit_window_after_the_rescale_follows_the_standard() -> None:
    img = _gradient(16)
    ds = rsna_dataset(img, encoding="window16", patient_id="p")  # intercept -1000, a window in rescaled units
    ds.WindowCenter, ds.WindowWidth = "1000", "1500"  # stored 2000 +- 750
    got = _decode(ds).astype(float)
    want = _window_reference(img.astype(float) - 1000, 1000, 1500)
    assert np.abs(got - want).max() <= 1.0
    assert got.min() == 0 and got.max() == 255  # clipped outside the window


def test_voi_lut_sequence_and_monochrome1() -> None:
    img = _gradient(16)
    ds = rsna_dataset(img, encoding="voilut16", patient_id="p")  # MONOCHROME1, stores 4095 - img, 12-bit LUT
    lut = np.frombuffer(ds.VOILUTSequence[0].LUTData, "<u2").astype(float)
    got = _decode(ds).astype(float)
    want = 255 - np.floor(lut[4095 - img.astype(int)] / 4095 * 255 + 0.5)
    assert np.abs(got - want).max() <= 1.0
    assert np.corrcoef(got[0], img[0])[0, 1] > 0.9  # bright stays bright after the inversion


def test_16bit_without_voi_gets_the_percentile_window() -> None:
    img = _gradient(16)
    ds = rsna_dataset(img, encoding="window16", patient_id="p")
    del ds.WindowCenter, ds.WindowWidth
    got = _decode(ds)
    assert got[:, 0].max() <= 2 and got[:, -1].min() >= 253  # spread over the whole 8-bit range


def test_8bit_uncompressed_through_pydicom() -> None:
    from pydicom.uid import ExplicitVRLittleEndian

    img = _gradient(8)
    ds = rsna_dataset(img, encoding="jpeg8", patient_id="p")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = img.tobytes()
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", False
    del ds.LossyImageCompression, ds.LossyImageCompressionMethod
    assert np.array_equal(_decode(ds), img)


@pytest.mark.parametrize(
    "mangle, reason, detail",
    [
        (lambda b: b[: len(b) // 2], "undecodable_image", "without pixel data .*End of file reached"),  # truncated
        (lambda b: b"\x00" * 128 + b"DICM" + b"\x13" * 200, "undecodable_image", "DICOM without pixel data"),
        (lambda b: b"just some text", "undecodable_image", "not a readable DICOM"),
        (lambda b: b"", "undecodable_image", "empty file"),
    ],
)
def test_corrupt_files_raise_with_a_reason(mangle, reason: str, detail: str) -> None:
    good = encode_dicom(rsna_dataset(_gradient(8), encoding="jpeg8", patient_id="p"))
    with pytest.raises(ImageError, match=detail) as e:
        decode_dicom(mangle(good), 64, name="x.dcm")
    assert e.value.reason == reason


def test_colour_and_missing_files(tmp_path: Path) -> None:
    ds = rsna_dataset(_gradient(8), encoding="jpeg8", patient_id="p")
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "RGB", 3
    with pytest.raises(ImageError, match="expected MONOCHROME1/2") as e:
        decode_dicom(encode_dicom(ds), 64)
    assert e.value.reason == "unsupported_image"
    with pytest.raises(ImageError, match="does not exist") as e:
        load_resize(tmp_path / "nope.dcm", 64)
    assert e.value.reason == "missing_image"


def test_header_and_age(tmp_path: Path) -> None:
    p = tmp_path / "a.dcm"
    p.write_bytes(encode_dicom(rsna_dataset(_gradient(8), encoding="jpeg8", patient_id="p", view="AP", sex="F", age=7)))
    assert read_header(p) == {"view": "AP", "sex": "F", "age": 7}
    assert read_header(tmp_path / "missing.dcm") is None
    (tmp_path / "bad.dcm").write_bytes(b"garbage")
    assert read_header(tmp_path / "bad.dcm") is None
    assert [parse_age(v) for v in ("51", "051Y", " 9 ", "", "003M", "abc")] == [51, 51, 9, None, None, None]
