"""Synthetic MIMIC-CXR-JPG 2.0.0 and CheXpert v1.0 datasets in their published layouts.

`make_mimic` and `make_chexpert` write procedurally drawn radiographs (findings leave a visible
trace), label files, metadata and MIMIC-style free-text reports, deterministically for a seed,
so the toolkit can be run and tested without credentialed data. No torch import here.
"""

from cxrfast.synth.chexpert import make_chexpert
from cxrfast.synth.mimic import make_mimic
from cxrfast.synth.radiograph import Anatomy, Pose, draw_radiograph, render

__all__ = ["Anatomy", "Pose", "draw_radiograph", "make_chexpert", "make_mimic", "render"]
