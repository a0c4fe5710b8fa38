"""`cxrfast bench NAME [ARGS...]`: run one benchmark module's `main(argv)`."""

from __future__ import annotations

import importlib

import typer

BENCHMARKS: dict[str, str] = {
    "shard": "cxrfast.bench.shard_throughput",
    "pipelines": "cxrfast.bench.loader_throughput",
    "kernels": "cxrfast.bench.kernel_speed",
    "train": "cxrfast.bench.train_throughput",
    "gpu": "cxrfast.bench.gpu_suite",
    "maxsize": "cxrfast.bench.max_size",
    "eval": "cxrfast.bench.eval_probe",
}


def bench_cmd(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help=f"One of: {', '.join(BENCHMARKS)}."),
) -> None:
    """Run a benchmark; it writes JSON + PNG under its --out and appends a row to bench/RESULTS.md.

    `cxrfast bench NAME --help` lists NAME's own options."""
    if name is None or name in ("-h", "--help"):
        typer.echo(f"usage: cxrfast bench {{{','.join(BENCHMARKS)}}} [OPTIONS]\n\n{bench_cmd.__doc__}")
        raise typer.Exit(0)
    if name not in BENCHMARKS:
        raise typer.BadParameter(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    module = importlib.import_module(BENCHMARKS[name])
    raise typer.Exit(module.main(list(ctx.args)) or 0)
