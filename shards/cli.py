"""`cxrfast shard mimic|chexpert|nih|rsna` and `cxrfast inspect`."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrfast.shards.options import DEFAULT_MAX_SKIPPED_FRACTION

shard_app = typer.Typer(help="Shard a raw dataset tree into WebDataset tars + DALI indices.", no_args_is_help=True)

_MAX_SIZE = typer.Option(512, "--max-size", help="Long side of the written JPEGs (aspect kept, never upscaled).")
_QUALITY = typer.Option(95, "--quality", help="JPEG quality of the written images.")
_SPT = typer.Option(None, "--samples-per-tar", help="Samples per tar (default: from --target-tar-mb).")
_TARGET = typer.Option(256.0, "--target-tar-mb", help="Approximate tar size in MB when --samples-per-tar is not given.")
_WORKERS = typer.Option(None, "--workers", help="Worker processes (default: all cores).")
_SEED = typer.Option(0, "--seed", help="Seed of the sample order (and of CheXpert's and NIH's validate hold-out).")
_VIEWS = typer.Option("PA,AP", "--views", help="Comma-separated views to keep, or 'all'.")
_VOCAB = typer.Option(30000, "--vocab-size", help="WordPiece vocabulary size when training the tokenizer.")
_OVERWRITE = typer.Option(
    False, "--overwrite",
    help="Rebuild --out when it holds shards of another dataset, parameters or inputs (only our files are deleted), "
    "or write into a non-empty folder that holds none of ours.",
)  # fmt: skip
_IMAGE_EXT = typer.Option("jpg", "--image-ext", help="Source image extension to look for first: jpg or png (16-bit).")
_MAX_SKIPPED = typer.Option(
    DEFAULT_MAX_SKIPPED_FRACTION, "--max-skipped-fraction",
    help="Fail when more than this share of the rows is skipped (missing/corrupt images); 1 accepts any.",
)  # fmt: skip


def _fail(e: Exception) -> typer.Exit:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _errors() -> tuple[type[Exception], ...]:
    """What a sharding run reports as `error: ...` (bad input, a failed worker task), not a traceback."""
    from cxrfast.shards.pool import WorkerError

    return (ValueError, WorkerError)


@shard_app.command("mimic")
def mimic(
    root: Path = typer.Option(..., "--root", help="MIMIC-CXR-JPG root (files/ and the four csv.gz), or a folder above it."),
    reports: Path = typer.Option(..., "--reports", help="mimic-cxr-reports.zip, or the folder holding its files/ tree."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    max_size: int = _MAX_SIZE,
    quality: int = _QUALITY,
    samples_per_tar: int | None = _SPT,
    target_tar_mb: float = _TARGET,
    workers: int | None = _WORKERS,
    seed: int = _SEED,
    views: str = _VIEWS,
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="A local HF tokenizer (tokenizer.json, or a folder with it or vocab.txt) instead of training one."
    ),
    vocab_size: int = _VOCAB,
    labels: str = typer.Option("chexpert", "--labels", help="Label CSV: chexpert or negbio."),
    image_ext: str = _IMAGE_EXT,
    overwrite: bool = _OVERWRITE,
    max_skipped_fraction: float = _MAX_SKIPPED,
) -> None:
    """MIMIC-CXR-JPG 2.0.0 + reports -> shards (frontal views, reports tokenized)."""
    from cxrfast.shards.build import shard_mimic

    try:
        s = shard_mimic(
            root, reports, out, max_size=max_size, quality=quality, samples_per_tar=samples_per_tar,
            target_tar_mb=target_tar_mb, workers=workers, seed=seed, views=views, tokenizer=tokenizer,
            vocab_size=vocab_size, overwrite=overwrite, labels=labels, image_ext=image_ext,
            max_skipped_fraction=max_skipped_fraction,
        )  # fmt: skip
    except _errors() as e:
        raise _fail(e) from e
    typer.echo(s.line())


@shard_app.command("chexpert")
def chexpert(
    root: Path = typer.Option(..., "--root", help="The CheXpert-v1.0[-small] folder (train.csv, valid.csv), or the folder holding it."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    max_size: int = _MAX_SIZE,
    quality: int = _QUALITY,
    samples_per_tar: int | None = _SPT,
    target_tar_mb: float = _TARGET,
    workers: int | None = _WORKERS,
    seed: int = _SEED,
    views: str = _VIEWS,
    validate_fraction: float = typer.Option(0.1, "--validate-fraction", help="Share of train patients held out as validate."),
    image_ext: str = _IMAGE_EXT,
    overwrite: bool = _OVERWRITE,
    max_skipped_fraction: float = _MAX_SKIPPED,
) -> None:
    """CheXpert v1.0(-small) -> shards (valid.csv becomes test; validate held out by patient)."""
    from cxrfast.shards.build import shard_chexpert

    try:
        s = shard_chexpert(
            root, out, max_size=max_size, quality=quality, samples_per_tar=samples_per_tar, target_tar_mb=target_tar_mb,
            workers=workers, seed=seed, views=views, validate_fraction=validate_fraction, overwrite=overwrite,
            image_ext=image_ext, max_skipped_fraction=max_skipped_fraction,
        )  # fmt: skip
    except _errors() as e:
        raise _fail(e) from e
    typer.echo(s.line())


@shard_app.command("nih")
def nih(
    root: Path = typer.Option(..., "--root", help="The NIH ChestX-ray14 folder (Data_Entry CSV, split lists, images/ or images_NNN/images/)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    max_size: int = _MAX_SIZE,
    quality: int = _QUALITY,
    samples_per_tar: int | None = _SPT,
    target_tar_mb: float = _TARGET,
    workers: int | None = _WORKERS,
    seed: int = _SEED,
    views: str = _VIEWS,
    validate_fraction: float | None = typer.Option(
        None, "--validate-fraction", help="Share of train_val patients held out as validate [default: 0.1]."
    ),
    validate_list: Path | None = typer.Option(
        None, "--validate-list", help="Images (first token per line) to hold out as validate instead of drawing patients."
    ),
    overwrite: bool = _OVERWRITE,
    max_skipped_fraction: float = _MAX_SKIPPED,
) -> None:
    """NIH ChestX-ray14 -> shards (test_list.txt becomes test; validate held out of train_val by patient)."""
    from cxrfast.shards.build import shard_nih

    try:
        s = shard_nih(
            root, out, max_size=max_size, quality=quality, samples_per_tar=samples_per_tar, target_tar_mb=target_tar_mb,
            workers=workers, seed=seed, views=views, validate_fraction=validate_fraction, validate_list=validate_list,
            overwrite=overwrite, max_skipped_fraction=max_skipped_fraction,
        )  # fmt: skip
    except _errors() as e:
        raise _fail(e) from e
    typer.echo(s.line())


@shard_app.command("rsna")
def rsna(
    root: Path = typer.Option(..., "--root", help="The RSNA Pneumonia folder (stage_2_train_labels.csv, stage_2_train_images/)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    max_size: int = _MAX_SIZE,
    quality: int = _QUALITY,
    samples_per_tar: int | None = _SPT,
    target_tar_mb: float = _TARGET,
    workers: int | None = _WORKERS,
    seed: int = typer.Option(0, "--seed", help="Seed of the sample order and the patient split (0: MGCA's split)."),
    views: str = _VIEWS,
    validate_fraction: float = typer.Option(0.15, "--validate-fraction", help="Share of patients in validate (MGCA: 0.15)."),
    test_fraction: float = typer.Option(0.15, "--test-fraction", help="Share of patients in test (MGCA: 0.15)."),
    overwrite: bool = _OVERWRITE,
    max_skipped_fraction: float = _MAX_SKIPPED,
) -> None:
    """RSNA Pneumonia stage 2 -> shards (one sample per patient, label Target, boxes in the JSON)."""
    from cxrfast.shards.build import shard_rsna

    try:
        s = shard_rsna(
            root, out, max_size=max_size, quality=quality, samples_per_tar=samples_per_tar, target_tar_mb=target_tar_mb,
            workers=workers, seed=seed, views=views, validate_fraction=validate_fraction, test_fraction=test_fraction,
            overwrite=overwrite, max_skipped_fraction=max_skipped_fraction,
        )  # fmt: skip
    except _errors() as e:
        raise _fail(e) from e
    typer.echo(s.line())


def inspect_cmd(
    shards: Path = typer.Argument(..., help="A shard folder (holding manifest.json)."),
    sheet: Path | None = typer.Option(None, "--sheet", help="Contact sheet PNG (default: DIR/contact_sheet.png)."),
    samples: int = typer.Option(16, "--samples", help="Random samples on the contact sheet (0: no sheet)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the contact sheet's samples."),
) -> None:
    """Verify a shard folder (sha256, DALI indices, members, labels, counts, tokenizer, sample
    table), print statistics and the verdict, then write a contact sheet; exit 1 listing every
    inconsistency."""
    from cxrfast.shards.inspect import inspect_shards, write_contact_sheet

    try:
        report = inspect_shards(shards, samples=samples, seed=seed)
    except ValueError as e:
        raise _fail(e) from e
    typer.echo(report.text())
    if report.problems:
        typer.secho(f"{len(report.problems)} problem(s) in {shards}:", fg=typer.colors.RED, err=True)
        for p in report.problems:
            typer.secho(f"  - {p}", fg=typer.colors.RED, err=True)
    else:
        typer.secho(f"OK: {shards} is consistent", fg=typer.colors.GREEN)
    # The verdict is out before the sheet: a folder we cannot write into (read-only) still gets it.
    path = sheet or shards / "contact_sheet.png"
    try:
        if write_contact_sheet(report, path) is not None:
            typer.echo(f"contact sheet: {path}")
    except OSError as e:
        typer.secho(
            f"{'error' if sheet else 'warning'}: cannot write the contact sheet {path} ({e.strerror or e})"
            + ("" if sheet else "; pass --sheet PATH to write it elsewhere"),
            fg=typer.colors.RED if sheet else typer.colors.YELLOW, err=True,
        )  # fmt: skip
        if sheet and not report.problems:
            raise typer.Exit(2) from None
    if report.problems:
        raise typer.Exit(1)
