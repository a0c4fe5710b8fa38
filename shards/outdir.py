"""The output folder of a sharding run: which files in it are ours, the guard that refuses a
folder holding someone else's files or another run's shards, and the clean-ups.

A folder is *ours* when it holds our `.progress/params.json` or a manifest of ours (a JSON object
with `format_version`, `dataset` and `cxrfast_version`). In a folder that is not ours every entry
but our lock file is foreign: a non-empty such folder is refused unless `--overwrite`, and even
then when a foreign file has a name we would write (`train-000000.tar`, `manifest.json`, ...):
nothing here ever deletes or replaces a file this tool did not write. In a folder of ours,
`--overwrite` deletes our files (never other files) when the dataset, the parameters or the inputs
changed.

The *resume key* of a run is its dataset and creation parameters minus `PROVENANCE_KEYS` (the
input paths: the same tables copied elsewhere are the same input; their content is in
`inputs`). A folder of ours whose key differs is refused unless `--overwrite`, and the refusal
names what changed (parameter by parameter, input file by input file).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from cxrfast.shards.lock import LOCK_FILE
from cxrfast.shards.manifest import PROGRESS_DIR, read_manifest, write_json_atomic
from cxrfast.shards.schema import MANIFEST, SAMPLE_TABLE, SKIPPED, TOKENIZER

log = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
#: `cxrfast inspect`'s default contact sheet.
CONTACT_SHEET = "contact_sheet.png"
#: Creation parameters recorded for provenance but not part of the resume key.
PROVENANCE_KEYS = ("root", "reports", "tokenizer")

_SHARD_FILE = re.compile(r"^(train|validate|test)-\d{6}\.(tar|idx)(\.tmp)?$")
_FIXED = (MANIFEST, TOKENIZER, SKIPPED, SAMPLE_TABLE, CONTACT_SHEET)
_OUR_NAMES = {PROGRESS_DIR, *_FIXED, *(f + ".tmp" for f in _FIXED), CONTACT_SHEET + ".tmp.png"}


def is_our_name(name: str) -> bool:
    """A name this tool writes in an output folder (shards, manifest, tables, temporaries)."""
    return name in _OUR_NAMES or bool(_SHARD_FILE.match(name)) or name.startswith("wordpiece-")


def check_out_path(out: Path) -> None:
    """ValueError when `out` cannot be an output folder: a file, or below a file."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"is below {p}, which is a file"
                raise ValueError(f"--out {out} {what}; expected a folder")
            return


def make_out(out: Path) -> bool:
    """Create `out` (and parents); True when it did not exist. ValueError when it cannot be made."""
    check_out_path(out)
    existed = out.is_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    return not existed


def _ours(out: Path) -> bool:
    params = out / PROGRESS_DIR / PARAMS_FILE
    try:
        p = json.loads(params.read_text())
        if isinstance(p, dict) and "dataset" in p and "params" in p:
            return True
    except (OSError, ValueError):
        pass
    try:
        read_manifest(out, required=("format_version", "dataset", "cxrfast_version"))
        return True
    except (OSError, ValueError):
        return False


def _empty_progress(p: Path) -> bool:
    return p.name == PROGRESS_DIR and p.is_dir() and not any(p.iterdir())


def check_not_foreign(out: Path, *, overwrite: bool) -> None:
    """Refuse a non-empty folder that is not ours (see the module doc)."""
    if not out.is_dir() or _ours(out):
        return
    # Our lock file, and the empty progress folder a run that died while claiming leaves, are ours.
    foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE and not _empty_progress(p))
    if not foreign:
        return
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    clash = [n for n in foreign if is_our_name(n)]
    if clash:
        raise ValueError(
            f"refusing to write into {out}: it holds files that were not written by cxrfast shard ({shown}), "
            f"some with names it would write ({', '.join(clash[:5])}); it never deletes or replaces files it did "
            "not write, even with --overwrite: move them away or pick another --out"
        )
    if not overwrite:
        raise ValueError(
            f"refusing to write into {out}: it is not empty and holds no shards of ours ({shown}); "
            "pick an empty or new --out, or pass --overwrite to write next to those files (they are left alone)"
        )
    log.warning("--overwrite: writing into %s next to %d files that are not ours (left alone)", out, len(foreign))


def resume_key(dataset: str, params: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for earlier output to be kept: the dataset and the parameters, input
    fingerprints included, without the input paths."""
    return {"dataset": dataset, **{k: v for k, v in params.items() if k not in PROVENANCE_KEYS}}


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two resume keys, e.g. `max_size 512 -> 256; input labels_csv changed`."""
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "inputs" and isinstance(a, dict) and isinstance(b, dict):
            for f in sorted(set(a) | set(b)):
                if a.get(f) != b.get(f):
                    name = (b.get(f) or a.get(f) or {}).get("file", f)
                    state = "is new" if f not in a else "is gone" if f not in b else "changed"
                    parts.append(f"input {f} ({name}) {state}")
        elif k == "inputs":
            parts.append("the input fingerprints were not recorded (made by an older cxrfast)")
        else:
            parts.append(f"{k} {a!r} -> {b!r}")
    return "; ".join(parts)


def prepare_output(out: Path, dataset: str, params: dict[str, Any], *, overwrite: bool) -> None:
    """Make `out` (which exists and whose lock we hold) ready for a run: refuse a foreign folder
    and one holding another dataset's, other parameters' or other inputs' shards unless
    `overwrite` (then delete our files there); keep the progress of a run with the same key."""
    check_not_foreign(out, overwrite=overwrite)
    key = resume_key(dataset, params)
    reasons = []
    man = out / MANIFEST
    if man.exists():
        try:
            m = read_manifest(out, required=())
            if m.get("dataset") != dataset:
                reasons.append(f"{man} is a manifest of dataset {m.get('dataset')!r}, not {dataset!r}")
            elif (old := resume_key(dataset, m.get("created_with") or {})) != key:
                reasons.append(f"{man} was made from other parameters or inputs: {describe_change(old, key)}")
        except (ValueError, OSError) as e:
            reasons.append(f"{man} is unreadable ({e})")
    prog = out / PROGRESS_DIR / PARAMS_FILE
    if prog.exists() and not reasons:
        try:
            p = json.loads(prog.read_text())
            if p.get("dataset") != dataset:
                reasons.append(f"{out} holds an unfinished run of dataset {p.get('dataset')!r}")
            elif (old := resume_key(dataset, p.get("params") or {})) != key:
                reasons.append(f"{out} holds an unfinished run with other parameters or inputs: {describe_change(old, key)}")
        except (ValueError, OSError, AttributeError) as e:
            reasons.append(f"{prog} is unreadable ({e})")
    if reasons:
        if not overwrite:
            raise ValueError(f"refusing to write into {out}: {'; '.join(reasons)} (use --overwrite to rebuild)")
        log.warning("--overwrite: deleting the shards in %s (%s)", out, "; ".join(reasons))
        clean(out)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    write_json_atomic(prog, {"dataset": dataset, "params": params})


def clean(out: Path) -> None:
    """Delete our files in `out` (see `is_our_name`); any other file is left alone."""
    for p in out.iterdir():
        if not is_our_name(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def remove_stale(out: Path, keep: set[str]) -> None:
    """Delete tars/idx files (and temporaries) of ours that the manifest does not list."""
    for p in out.iterdir():
        if _SHARD_FILE.match(p.name) and p.name not in keep:
            p.unlink()


__all__ = [
    "PROVENANCE_KEYS", "check_out_path", "make_out", "check_not_foreign", "resume_key", "describe_change",
    "prepare_output", "clean", "remove_stale", "is_our_name",
]  # fmt: skip
