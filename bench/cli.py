"""`cxrfast bench NAME [ARGS...]`: run one benchmark module's `main(argv)`."""

from __future__ import annotations

import importlib

import typer

BENCHMARKS: dict[str, str] = {
    "shard": "cxrfast.bench.shard_throughput",
    "pipelines": "cxrfast.bench.loader_throughput",
    "kernels": "cxrfast.bench.kernel_speed",
    "train": "cxrfast.bench.train_throughput",
}


def bench_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help=f"One of: {', '.join(BENCHMARKS)}. Pass --help after it for its options."),
) -> None:
    """Run a benchmark; it writes JSON + PNG under its --out and appends a row to bench/RESULTS.md."""
    if name not in BENCHMARKS:
        raise typer.BadParameter(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    module = importlib.import_module(BENCHMARKS[name])
    raise typer.Exit(module.main(list(ctx.args)) or 0)
