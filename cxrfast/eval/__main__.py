"""`python -m cxrfast.eval ...` = `cxrfast eval ...`; the entry point of the deepspeed launcher:

    deepspeed --num_gpus 4 --module cxrfast.eval finetune --shards DIR --encoder RUN/encoder.safetensors ...

The launcher puts `--local_rank=N` before the subcommand; the rank comes from LOCAL_RANK instead,
so that argument is dropped here.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> None:
    from cxrfast.eval.cli import eval_app

    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--local_rank":
            skip = True
        elif not a.startswith("--local_rank="):
            kept.append(a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    eval_app(kept, prog_name="cxrfast eval")


if __name__ == "__main__":
    main()
