"""Pre-train a preset under DeepSpeed ZeRO.

    cxrfast train --preset tiny_mrm --shards data/shards/mimic --out runs/demo epochs=2
    deepspeed --num_gpus 4 --module cxrfast.train --preset mrm_vitb --shards data/shards/mimic-1280 \\
        --out runs/mrm method.init=mae_pretrain_vit_base.pth
    deepspeed --num_gpus 4 cxrfast/train.py --preset mrm_vitb ...          (from a source checkout)
    cxrfast train --preset mae_cxr_vits --shards data/shards/chexpert data/shards/nih --out runs/mae

Several --shards folders are trained on as their union (every sample of every folder once per
epoch); config.json records each folder's dataset, sample count and share.

Trailing `key=value` arguments override the preset (`cxrfast.config`: dotted paths such as
`method.mask_ratio=0.8` or unique bare names such as `epochs=2`). OUT receives config.json,
metrics.jsonl, tb/ (TensorBoard), checkpoints/ and encoder.safetensors.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

if not __package__:  # run as a file: drop cxrfast/ from sys.path so its modules cannot shadow top-level ones
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

log = logging.getLogger("cxrfast.train")

#: A `key=value` override (a dotted config path, then "="), as opposed to a shard folder path.
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from cxrfast.presets import PRESETS

    p = argparse.ArgumentParser(prog="cxrfast train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="named run (cxrfast.presets)")
    p.add_argument("--shards", required=True, type=Path, nargs="+", metavar="DIR",
                   help="shard folder(s) (with manifest.json); several are trained on as their union")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--data", choices=("dali", "torch", "synthetic"), help="data backend (= data.backend=...)")
    p.add_argument("--no-fused", action="store_true", help="plain-PyTorch kernels (= method.fused=false)")
    p.add_argument("--deepspeed_config", type=Path, help="DeepSpeed JSON merged over the generated settings")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--resume-from", type=Path, metavar="CKPT",
                   help="continue from a checkpoints folder (its latest) or one checkpoint folder in it")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK is used)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="preset overrides, e.g. epochs=2 optim.blr=3e-4")
    args = p.parse_args(argv)
    # `--shards A B epochs=2`: the folder list swallows the overrides that follow it; give them back
    folders = [s for s in args.shards if not (_OVERRIDE.match(str(s)) and not s.exists())]
    if not folders:
        p.error("--shards needs at least one shard folder")
    args.overrides = [str(s) for s in args.shards if s not in folders] + args.overrides
    args.shards = folders
    return args


def resolve_config(args: argparse.Namespace):
    from cxrfast.config import apply_overrides
    from cxrfast.presets import get_preset

    extra = [f"data.backend={args.data}"] if args.data else []
    extra += ["method.fused=false"] if args.no_fused else []
    return apply_overrides(get_preset(args.preset), list(args.overrides) + extra)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)  # config errors surface before any process group exists
    except ValueError as e:
        log.error("%s", e)
        return 2

    from cxrfast.trainer import distributed
    from cxrfast.trainer.checkpoint import CheckpointError
    from cxrfast.trainer.metrics import NonFiniteLoss
    from cxrfast.trainer.run import run

    distributed.init()
    try:
        run(cfg, shards=args.shards, out=args.out, ds_file=args.deepspeed_config,
            resume=args.resume_from or (args.out / "checkpoints" if args.resume else None))
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteLoss) as e:  # the same on every rank
        log.error("%s: %s", type(e).__name__, e)
        return 1
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
