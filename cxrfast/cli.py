"""The `cxrfast` command line. Subcommands live next to the code they drive and import
their heavy dependencies inside the command functions, so `cxrfast shard` never loads torch."""

from __future__ import annotations

import logging

import typer

from cxrfast.bench.cli import bench_cmd
from cxrfast.eval.cli import eval_app
from cxrfast.shards.cli import inspect_cmd, shard_app
from cxrfast.synth.cli import synth_app

app = typer.Typer(
    help="cxrfast: shard chest X-ray datasets, load them with DALI, pre-train with DeepSpeed.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(synth_app, name="synth")
app.add_typer(shard_app, name="shard")
app.command("inspect")(inspect_cmd)
app.add_typer(eval_app, name="eval")
app.command(
    "bench",
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(bench_cmd)


@app.command(
    "train",
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def train_cmd(ctx: typer.Context) -> None:
    """Pre-train a preset (single process; several ranks: `deepspeed --module cxrfast.train ...`).
    `cxrfast train --help` lists the options."""
    from cxrfast.train import main

    raise typer.Exit(main(list(ctx.args)))


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """cxrfast: shard chest X-ray datasets, load them with DALI, pre-train with DeepSpeed."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    app()
