"""`cxrfast eval linprobe|finetune|compare`. Heavy imports (torch, DALI, timm, DeepSpeed) happen inside
the commands. Several ranks: `deepspeed --num_gpus N --module cxrfast.eval finetune ...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

eval_app = typer.Typer(
    help="Evaluate encoders with the published protocols: label fractions by patient, AUC with bootstrap CIs.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(e: Exception) -> typer.Exit:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


# Options both `linprobe` and `finetune` take (one declaration each).
Shards = Annotated[Path, typer.Option("--shards", help="Labelled shard folder (train, validate and test splits).")]
Task = Annotated[str, typer.Option("--task", help="chexpert5 | chexpert14 | mimic14 | pleural_effusion | nih14 | rsna.")]
Out = Annotated[Path, typer.Option("--out", help="Evaluation folder (config.json, results.json, plots, predictions).")]
Encoder = Annotated[Path | None, typer.Option("--encoder", help="An exported encoder.safetensors (RUN/encoder.safetensors).")]
Timm = Annotated[str | None, typer.Option("--timm", help="A timm architecture (with --init random or --weights FILE).")]
Init = Annotated[str | None, typer.Option("--init", help="random: fresh weights (with --timm, or --encoder's architecture).")]
Weights = Annotated[Path | None, typer.Option("--weights", help="Local weights for --timm (.safetensors or torch).")]
TimmKwargs = Annotated[str, typer.Option("--timm-kwargs", help='JSON arguments for timm.create_model, e.g. \'{"img_size": 64}\'.')]
InitSeed = Annotated[int, typer.Option("--init-seed", help="Torch seed of a random init.")]
Fractions = Annotated[str | None, typer.Option("--fractions", help="Label fractions in (0, 1], e.g. 0.01,0.1,1 (default: the protocol's).")]
Draws = Annotated[int | None, typer.Option("--draws", help="Patient draws per fraction below 1 (default: the protocol's).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed of the draws, the training and the bootstrap (default 0).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace another evaluation in --out.")]
Overrides = Annotated[list[str] | None, typer.Argument(metavar="[KEY=VALUE]...", help="Override any knob, e.g. probe.lr=1e-3 views=all.")]  # fmt: skip


def _settings(encoder: Path | None, timm: str | None, init: str | None, weights: Path | None, timm_kwargs: str,
              init_seed: int, protocol: str, fractions: str | None, draws: int | None, seed: int | None,
              overrides: list[str] | None):  # fmt: skip
    """(EncoderSpec, Protocol) from the shared options; ValueError for a bad one."""
    from cxrfast.eval.encoders import EncoderSpec
    from cxrfast.eval.protocols import get_protocol

    flags = [f"data.fractions={fractions}"] if fractions is not None else []
    flags += [f"data.draws={draws}"] if draws is not None else []
    flags += [f"data.seed={seed}"] if seed is not None else []
    kwargs = json.loads(timm_kwargs)
    if not isinstance(kwargs, dict):
        raise ValueError(f"--timm-kwargs must be a JSON object, got {timm_kwargs!r}")
    spec = EncoderSpec(encoder=encoder, timm=timm, init=init, weights=weights, timm_kwargs=kwargs, init_seed=init_seed)
    return spec, get_protocol(protocol, flags + list(overrides or []))


def _summary_line(res: dict) -> str:
    mean = [r for r in res["summary"] if r["split"] == "test" and r["label"] == "mean"]
    return ", ".join(f"{r['fraction']:g}: {r['mean']:.3f}" if r["mean"] is not None else f"{r['fraction']:g}: undefined"
                     for r in mean)  # fmt: skip


@eval_app.command("linprobe")
def linprobe_cmd(
    shards: Shards, task: Task, out: Out, encoder: Encoder = None, timm: Timm = None, init: Init = None,
    weights: Weights = None, timm_kwargs: TimmKwargs = "{}", init_seed: InitSeed = 0,
    protocol: str = typer.Option("mgca", "--protocol", help="mgca | mrm | mae-cxr | moco-cxr (every knob of the published protocol)."),
    fractions: Fractions = None, draws: Draws = None, seed: Seed = None,
    augment: bool = typer.Option(False, "--augment", help="Published per-epoch probe through the frozen backbone with train augmentation (slow)."),
    overwrite: Overwrite = False, overrides: Overrides = None,
) -> None:  # fmt: skip
    """Linear probe: features extracted once and cached, a head per label fraction and draw, selected on validate,
    scored on test. Prints the table; writes EVAL/results.json, label_efficiency.png and roc.png."""
    from cxrfast.eval.linprobe import run_linprobe
    from cxrfast.eval.report import results_table

    try:
        spec, proto = _settings(encoder, timm, init, weights, timm_kwargs, init_seed, protocol, fractions, draws, seed,
                                overrides)  # fmt: skip
        res = run_linprobe(spec, shards, task, proto, out, augment=augment, overwrite=overwrite)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise _fail(e) from e
    typer.echo(results_table(res))
    typer.echo(f"{res['encoder']} {res['task']} test mean AUC by fraction ({_summary_line(res)}); wrote "
               f"{out}/results.json, {out}/label_efficiency.png, {out}/roc.png")  # fmt: skip


@eval_app.command("finetune")
def finetune_cmd(
    shards: Shards, task: Task, out: Out, encoder: Encoder = None, timm: Timm = None, init: Init = None,
    weights: Weights = None, timm_kwargs: TimmKwargs = "{}", init_seed: InitSeed = 0,
    protocol: str = typer.Option("mrm", "--protocol", help="mrm | mae-cxr | moco-cxr (every knob of the published fine-tuning)."),
    fractions: Fractions = None, draws: Draws = None, seed: Seed = None, overwrite: Overwrite = False,
    overrides: Overrides = None,
) -> None:  # fmt: skip
    """Full fine-tuning through the trainer (DeepSpeed; several ranks under `deepspeed --module cxrfast.eval
    finetune ...`): a run per label fraction and draw, the best state(s) on validate, test scored once.
    Prints the table; writes EVAL/results.json, label_efficiency.png and roc.png (runs under EVAL/train/)."""
    from cxrfast.eval.finetune import check_finetune, run_finetune
    from cxrfast.eval.report import results_table
    from cxrfast.trainer import distributed
    from cxrfast.trainer.checkpoint import CheckpointError
    from cxrfast.trainer.metrics import NonFiniteLoss

    try:  # settings errors come before any process group exists
        spec, proto = _settings(encoder, timm, init, weights, timm_kwargs, init_seed, protocol, fractions, draws, seed,
                                overrides)  # fmt: skip
        check_finetune(proto)
    except (ValueError, json.JSONDecodeError) as e:
        raise _fail(e) from e
    distributed.init()
    try:
        res = run_finetune(spec, shards, task, proto, out, overwrite=overwrite)
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteLoss) as e:  # the same on every rank
        raise _fail(e) from e
    finally:
        distributed.teardown()
    if res is None:  # not rank 0
        return
    typer.echo(results_table(res))
    typer.echo(f"{res['encoder']} {res['task']} fine-tuned, test mean AUC by fraction ({_summary_line(res)}); wrote "
               f"{out}/results.json, {out}/label_efficiency.png, {out}/roc.png")  # fmt: skip


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
