"""`cxrfast eval linprobe|compare`. Heavy imports (torch, DALI, timm) happen inside the commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

eval_app = typer.Typer(
    help="Evaluate encoders with the published protocols: label fractions by patient, AUC with bootstrap CIs.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(e: Exception) -> typer.Exit:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


@eval_app.command("linprobe")
def linprobe_cmd(
    shards: Path = typer.Option(..., "--shards", help="Labelled shard folder (train, validate and test splits)."),
    task: str = typer.Option(..., "--task", help="chexpert5 | chexpert14 | mimic14 | pleural_effusion | nih14 | rsna."),
    out: Path = typer.Option(..., "--out", help="Evaluation folder (config.json, results.json, plots, predictions)."),
    encoder: Path | None = typer.Option(None, "--encoder", help="An exported encoder.safetensors (RUN/encoder.safetensors)."),
    timm: str | None = typer.Option(None, "--timm", help="A timm architecture (with --init random or --weights FILE)."),
    init: str | None = typer.Option(None, "--init", help="random: fresh weights (with --timm, or --encoder's architecture)."),
    weights: Path | None = typer.Option(None, "--weights", help="Local weights for --timm (.safetensors or torch)."),
    timm_kwargs: str = typer.Option("{}", "--timm-kwargs", help='JSON arguments for timm.create_model, e.g. \'{"img_size": 64}\'.'),
    init_seed: int = typer.Option(0, "--init-seed", help="Torch seed of a random init."),
    protocol: str = typer.Option("mgca", "--protocol", help="mgca | mrm | mae-cxr | moco-cxr (every knob of the published protocol)."),
    fractions: str | None = typer.Option(None, "--fractions", help="Label fractions in (0, 1], e.g. 0.01,0.1,1 (default: the protocol's)."),
    draws: int | None = typer.Option(None, "--draws", help="Patient draws per fraction below 1 (default: the protocol's)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the draws, heads and bootstrap (default 0)."),
    augment: bool = typer.Option(False, "--augment", help="Published per-epoch probe through the frozen backbone with train augmentation (slow)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace another evaluation in --out."),
    overrides: list[str] | None = typer.Argument(None, metavar="[KEY=VALUE]...", help="Override any knob, e.g. probe.lr=1e-3 views=all."),
) -> None:  # fmt: skip
    """Linear probe: features extracted once and cached, a head per label fraction and draw, selected on validate,
    scored on test. Prints the table; writes EVAL/results.json, label_efficiency.png and roc.png."""
    from cxrfast.eval.encoders import EncoderSpec
    from cxrfast.eval.linprobe import run_linprobe
    from cxrfast.eval.protocols import get_protocol
    from cxrfast.eval.report import results_table

    flags = [f"data.fractions={fractions}"] if fractions is not None else []
    flags += [f"data.draws={draws}"] if draws is not None else []
    flags += [f"data.seed={seed}"] if seed is not None else []
    try:
        kwargs = json.loads(timm_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"--timm-kwargs must be a JSON object, got {timm_kwargs!r}")
        spec = EncoderSpec(encoder=encoder, timm=timm, init=init, weights=weights, timm_kwargs=kwargs, init_seed=init_seed)
        proto = get_protocol(protocol, flags + list(overrides or []))
        res = run_linprobe(spec, shards, task, proto, out, augment=augment, overwrite=overwrite)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise _fail(e) from e
    typer.echo(results_table(res))
    mean = [r for r in res["summary"] if r["split"] == "test" and r["label"] == "mean"]
    line = ", ".join(f"{r['fraction']:g}: {r['mean']:.3f}" if r["mean"] is not None else f"{r['fraction']:g}: undefined"
                     for r in mean)  # fmt: skip
    typer.echo(f"{res['encoder']} {res['task']} test mean AUC by fraction ({line}); wrote {out}/results.json, "
               f"{out}/label_efficiency.png, {out}/roc.png")  # fmt: skip


@eval_app.command("compare")
def compare_cmd(
    folders: list[Path] = typer.Argument(..., help="Evaluation folders (the first is the reference of the differences)."),
    out: Path | None = typer.Option(None, "--out", help="Write compare.json and label_efficiency.png here."),
    boot: int | None = typer.Option(None, "--boot", help="Patient resamples (default: the evaluations')."),
    seed: int | None = typer.Option(None, "--seed", help="Bootstrap seed (default: the evaluations')."),
) -> None:  # fmt: skip
    """Encoders side by side on the same test set, with paired bootstrap CIs of each difference to the first."""
    from cxrfast.eval.compare import compare, compare_table

    try:
        result = compare(list(folders), boot=boot, seed=seed, out=out)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(e) from e
    typer.echo(compare_table(result))
    if out is not None:
        typer.echo(f"wrote {out}/compare.json and {out}/label_efficiency.png")
