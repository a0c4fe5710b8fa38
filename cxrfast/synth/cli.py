"""`cxrfast synth mimic|chexpert|nih|rsna`: write a synthetic dataset in its published layout."""

from __future__ import annotations

import os
from pathlib import Path

import typer

synth_app = typer.Typer(
    help="Synthetic MIMIC-CXR-JPG / CheXpert / NIH ChestX-ray14 / RSNA Pneumonia datasets in their published layouts.",
    no_args_is_help=True,
    add_completion=False,
)


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@synth_app.command("mimic")
def mimic_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write files/, the four csv.gz and mimic-cxr-reports.zip into."),
    studies: int = typer.Option(200, "--studies", min=1, help="Number of studies (1-3 images each)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    size_min: int = typer.Option(2000, "--size-min", min=64, help="Smallest image side in pixels."),
    size_max: int = typer.Option(3000, "--size-max", min=64, help="Largest image side in pixels."),
    image_format: str = typer.Option("jpg", "--format", help="jpg (8-bit, as published) or png16 (16-bit PNG)."),
    workers: int = typer.Option(_default_workers(), "--workers", min=1, help="Drawing processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different dataset already in --out."),
) -> None:
    """MIMIC-CXR-JPG 2.0.0 tree + mimic-cxr-reports.zip."""
    from cxrfast.synth.mimic import make_mimic
    from cxrfast.synth.writing import summary_line

    if size_min > size_max:
        raise typer.BadParameter(f"--size-min {size_min} is larger than --size-max {size_max}")
    try:
        summary = make_mimic(out, studies=studies, seed=seed, size_range=(size_min, size_max),
                             image_format=image_format, workers=workers, overwrite=overwrite)  # fmt: skip
    except (FileExistsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(summary_line(summary))


@synth_app.command("chexpert")
def chexpert_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to hold CheXpert-v1.0-small/ (or CheXpert-v1.0/ with --full)."),
    patients: int = typer.Option(100, "--patients", min=1, help="Number of patients (train + valid)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    small: bool = typer.Option(True, "--small/--full", help="320-pixel short side (v1.0-small) or ~2000+ (v1.0)."),
    workers: int = typer.Option(_default_workers(), "--workers", min=1, help="Drawing processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different dataset already in --out."),
) -> None:
    """CheXpert v1.0(-small): train.csv, valid.csv, train/ and valid/."""
    from cxrfast.synth.chexpert import make_chexpert
    from cxrfast.synth.writing import summary_line

    try:
        summary = make_chexpert(out, patients=patients, seed=seed, small=small, workers=workers, overwrite=overwrite)
    except (FileExistsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(summary_line(summary))


@synth_app.command("nih")
def nih_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write the Data_Entry CSV, split lists, BBox list and images into."),
    images: int = typer.Option(200, "--images", min=1, help="Number of images (1-8 follow-ups per patient)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    layout: str = typer.Option("flat", "--layout", help="flat: images/ (the NIH download); kaggle: images_001/images/ ..."),
    data_entry: str = typer.Option("2017", "--data-entry", help="2017: Data_Entry_2017.csv; v2020: Data_Entry_2017_v2020.csv."),
    workers: int = typer.Option(_default_workers(), "--workers", min=1, help="Drawing processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different dataset already in --out."),
) -> None:
    """NIH ChestX-ray14: Data_Entry CSV, train_val_list.txt/test_list.txt, BBox_List_2017.csv, 1024x1024 PNGs."""
    from cxrfast.synth.nih import make_nih
    from cxrfast.synth.writing import summary_line

    try:
        summary = make_nih(out, images=images, seed=seed, layout=layout, data_entry=data_entry, workers=workers,
                           overwrite=overwrite)  # fmt: skip
    except (FileExistsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(summary_line(summary))


@synth_app.command("rsna")
def rsna_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write the stage-2 label/class CSVs and stage_2_train_images/ into."),
    patients: int = typer.Option(200, "--patients", min=1, help="Number of patients (one DICOM each)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    workers: int = typer.Option(_default_workers(), "--workers", min=1, help="Drawing processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different dataset already in --out."),
) -> None:
    """RSNA Pneumonia Detection stage 2: stage_2_train_labels.csv (one row per box), class CSV, DICOMs."""
    from cxrfast.synth.rsna import make_rsna
    from cxrfast.synth.writing import summary_line

    try:
        summary = make_rsna(out, patients=patients, seed=seed, workers=workers, overwrite=overwrite)
    except (FileExistsError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(summary_line(summary))
