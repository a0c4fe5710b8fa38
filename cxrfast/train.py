"""Pre-train a recipe under DeepSpeed ZeRO.

    deepspeed [--num_gpus N | --hostfile H] cxrfast/train.py --recipe mrm_vitb --shards shards/mimic --out runs/mrm
    python cxrfast/train.py --recipe tiny_mrm --shards shards/mimic --out runs/demo epochs=2

Trailing `key=value` arguments override the recipe (`cxrfast.config`). OUT receives config.json,
metrics.jsonl, tb/ (TensorBoard), checkpoints/ and encoder.safetensors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file: drop cxrfast/ from sys.path so its modules cannot shadow top-level ones
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

log = logging.getLogger("cxrfast.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from cxrfast.recipes import RECIPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--shards", required=True, type=Path, help="shard folder (with manifest.json)")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--data", choices=("dali", "torch", "synthetic"), help="data backend (= data.backend=...)")
    p.add_argument("--no-fused", action="store_true", help="plain-PyTorch kernels (= fused=false)")
    p.add_argument("--deepspeed_config", type=Path, help="DeepSpeed JSON merged over the generated settings")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--resume-from", type=Path, metavar="CKPT_DIR", help="continue from the latest checkpoint in CKPT_DIR")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK is used)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. epochs=2 optim.blr=3e-4")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace):
    from cxrfast.config import apply_overrides
    from cxrfast.recipes import get_recipe

    extra = [f"data.backend={args.data}"] if args.data else []
    extra += ["model.fused=false"] if args.no_fused else []
    return apply_overrides(get_recipe(args.recipe), list(args.overrides) + extra)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)  # config errors surface before any process group exists
    except ValueError as e:
        log.error("%s", e)
        return 2

    from cxrfast.trainer import distributed
    from cxrfast.trainer.run import run

    distributed.init()
    try:
        run(cfg, shards=args.shards, out=args.out, ds_file=args.deepspeed_config,
            resume=args.resume_from or (args.out / "checkpoints" if args.resume else None))
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
