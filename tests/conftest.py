"""Shared fixtures: one small synthetic MIMIC / CheXpert dataset and their shards per test session.

Sizes are small so the suite runs on 2 CPU cores; the layouts and formats are the published ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton picks its CPU interpreter when it is first imported (timm, transformers and deepspeed import
# it), so this must precede every test module; the cxrfast.kernels tests run their kernels under it.
# Export TRITON_INTERPRET=0 on a GPU machine to test the compiled kernels on CUDA instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Small but realistic enough: sources well above --max-size so reduced decoding is exercised.
MIMIC_STUDIES = 24
MIMIC_SIZE_RANGE = (700, 1000)
CHEXPERT_PATIENTS = 16
NIH_IMAGES = 24
RSNA_PATIENTS = 16


@pytest.fixture(scope="session")
def mimic_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic MIMIC-CXR-JPG tree (+ mimic-cxr-reports.zip) in the published layout."""
    from cxrfast.synth import make_mimic

    out = tmp_path_factory.mktemp("mimic_raw")
    make_mimic(out, studies=MIMIC_STUDIES, seed=0, size_range=MIMIC_SIZE_RANGE)
    return out


@pytest.fixture(scope="session")
def chexpert_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding a synthetic `CheXpert-v1.0-small/`."""
    from cxrfast.synth import make_chexpert

    out = tmp_path_factory.mktemp("chexpert_raw")
    make_chexpert(out, patients=CHEXPERT_PATIENTS, seed=0)
    return out


@pytest.fixture(scope="session")
def mimic_shards(mimic_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cxrfast shard mimic` output over `mimic_raw`: max-size 512, 8 samples per tar, 2 workers."""
    from cxrfast.shards.build import shard_mimic

    out = tmp_path_factory.mktemp("mimic_shards") / "mimic"
    shard_mimic(
        root=mimic_raw,
        reports=mimic_raw / "mimic-cxr-reports.zip",
        out=out,
        samples_per_tar=8,
        workers=2,
        vocab_size=2000,
    )
    return out


@pytest.fixture(scope="session")
def chexpert_shards(chexpert_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cxrfast shard chexpert` output (no reports: samples carry no ids/txt)."""
    from cxrfast.shards.build import shard_chexpert

    out = tmp_path_factory.mktemp("chexpert_shards") / "chexpert"
    shard_chexpert(root=chexpert_raw / "CheXpert-v1.0-small", out=out, samples_per_tar=8, workers=2)
    return out


@pytest.fixture(scope="session")
def mrm_tokenizer(mimic_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer in the layout of MRM's published `mimic_wordpiece.json` (no [SEP], no post-processor),
    trained on the synthetic reports."""
    import zipfile

    from shard_tiny import write_mrm_style_tokenizer

    with zipfile.ZipFile(mimic_raw / "mimic-cxr-reports.zip") as z:
        texts = [z.read(n).decode() for n in z.namelist() if n.endswith(".txt")]
    return write_mrm_style_tokenizer(tmp_path_factory.mktemp("mrm_tok") / "mimic_wordpiece.json", texts)


@pytest.fixture(scope="session")
def mimic_shards_mrm_tokenizer(mimic_raw: Path, mrm_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mimic_shards` tokenized with the MRM-style tokenizer (`--tokenizer mimic_wordpiece.json`)."""
    from cxrfast.shards.build import shard_mimic

    out = tmp_path_factory.mktemp("mimic_shards_mrm_tok") / "mimic"
    shard_mimic(root=mimic_raw, reports=mimic_raw / "mimic-cxr-reports.zip", out=out, samples_per_tar=8,
                workers=2, tokenizer=mrm_tokenizer)
    return out


@pytest.fixture(scope="session")
def nih_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic NIH ChestX-ray14 tree (flat `images/` layout, Data_Entry_2017.csv)."""
    from cxrfast.synth.nih import make_nih

    out = tmp_path_factory.mktemp("nih_raw")
    make_nih(out, images=NIH_IMAGES, seed=0)
    return out


@pytest.fixture(scope="session")
def nih_shards(nih_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cxrfast shard nih` output over `nih_raw` (4 samples per tar, 2 workers)."""
    from cxrfast.shards.build import shard_nih

    out = tmp_path_factory.mktemp("nih_shards") / "nih"
    shard_nih(nih_raw, out, samples_per_tar=4, workers=2, validate_fraction=0.2)
    return out


@pytest.fixture(scope="session")
def rsna_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic RSNA Pneumonia stage-2 training set (every DICOM encoding, multi-box patients)."""
    from cxrfast.synth.rsna import make_rsna

    out = tmp_path_factory.mktemp("rsna_raw")
    make_rsna(out, patients=RSNA_PATIENTS, seed=0)
    return out


@pytest.fixture(scope="session")
def rsna_shards(rsna_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cxrfast shard rsna` output over `rsna_raw` (4 samples per tar, 2 workers)."""
    from cxrfast.shards.build import shard_rsna

    out = tmp_path_factory.mktemp("rsna_shards") / "rsna"
    shard_rsna(rsna_raw, out, samples_per_tar=4, workers=2)
    return out


#: The evaluation tests' CheXpert: enough patients that validate and test hold several of them.
EVAL_PATIENTS = 60


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic CheXpert with frontal and lateral views, 128-px images, 20% of train patients held
    out as validate (about 38 train / 10 validate / 12 test patients)."""
    from cxrfast.shards.build import shard_chexpert
    from cxrfast.synth import make_chexpert

    raw = tmp_path_factory.mktemp("eval_raw")
    make_chexpert(raw, patients=EVAL_PATIENTS, seed=0, workers=2)
    out = tmp_path_factory.mktemp("eval_shards") / "chexpert"
    shard_chexpert(root=raw / "CheXpert-v1.0-small", out=out, samples_per_tar=64, workers=2, views="all",
                   max_size=128, validate_fraction=0.2)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported encoder.safetensors of the registry's tiny MAE ViT (64 px, seeded random weights)."""
    import torch

    from cxrfast.models import build_model
    from cxrfast.models.export import export_encoder

    torch.manual_seed(0)
    return export_encoder(build_model("mae_vit_tiny_test"), tmp_path_factory.mktemp("tiny_run") / "tiny_mae")
