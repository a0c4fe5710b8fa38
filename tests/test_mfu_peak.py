"""The MFU peak table matches whole GPU names: "L4" is not "L40" / "L40S", "A10" is not "A100"."""

from __future__ import annotations

import pytest

from cxrfast.trainer.metrics import peak_tflops


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA H200", 989.4),
        ("NVIDIA L4X", None),
        ("NVIDIA RTX A4000", None),
        ("", None),
        (None, None),
    ],
)
def test_peak_tflops_matches_whole_names(name: str | None, peak: float | None) -> None:
    assert peak_tflops(name) == peak
