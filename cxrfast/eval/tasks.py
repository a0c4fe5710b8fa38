"""Evaluation tasks: which labels a downstream task scores, found in a shard folder by NAME.

A task never indexes `labels.i8` by position: `task_labels` looks every label name up in the
folder's `label_names` (the manifest), so shards with another label order (NIH, RSNA) work, and
shards without a task's label fail with the names that are there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cxrfast.shards.folder import ShardFolder
from cxrfast.shards.schema import LABEL_NAMES

log = logging.getLogger(__name__)

#: The five CheXpert competition labels (CheXpert paper; MGCA, MRM, MAE-CXR evaluate on them).
CHEXPERT5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
#: NIH ChestX-ray14's labels, spelled as its Data_Entry_2017.csv spells them.
NIH14: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip

#: Views counted as frontal by the `views=frontal` filter (MIMIC ViewPosition, CheXpert AP/PA, NIH/RSNA).
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP")
VIEW_FILTERS: tuple[str, ...] = ("frontal", "all")


@dataclass(frozen=True, kw_only=True, slots=True)
class Task:
    """A multi-label (or single-label) classification task."""

    name: str
    #: label names, looked up by name in the shard folder's `label_names`
    labels: tuple[str, ...]
    #: the shard datasets the task is defined on (another dataset works, with a warning)
    datasets: tuple[str, ...]
    doc: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(name="chexpert5", labels=CHEXPERT5, datasets=("chexpert", "mimic"),
             doc="the 5 CheXpert competition labels (MGCA, MRM, MAE-CXR)"),
        Task(name="chexpert14", labels=LABEL_NAMES, datasets=("chexpert",), doc="CheXpert's 14 labels"),
        Task(name="mimic14", labels=LABEL_NAMES, datasets=("mimic",), doc="MIMIC-CXR's 14 CheXpert-labeler labels"),
        Task(name="pleural_effusion", labels=("Pleural Effusion",), datasets=("chexpert", "mimic"),
             doc="Pleural Effusion alone (MoCo-CXR)"),
        Task(name="nih14", labels=NIH14, datasets=("nih",), doc="NIH ChestX-ray14's 14 labels (MRM, MAE-CXR)"),
        Task(name="rsna", labels=("Pneumonia",), datasets=("rsna",), doc="RSNA Pneumonia, one label (MGCA, MRM)"),
    )
}  # fmt: skip


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def task_labels(task: Task, folder: ShardFolder) -> tuple[str, ...]:
    """The task's label names, each checked to be a label of `folder` (ValueError naming manifest.json
    and listing the folder's labels otherwise). Warns when the folder's dataset is not one the task
    is defined on."""
    have = folder.label_names
    missing = [name for name in task.labels if name not in have]
    if missing:
        raise ValueError(
            f"{folder.manifest_path}: task {task.name!r} needs labels {missing}, but these shards "
            f"(dataset {folder.dataset!r}) have {list(have)}"
        )
    if folder.dataset not in task.datasets:
        log.warning("task %s is defined on %s shards; %s holds dataset %r (labels matched by name)",
                    task.name, "/".join(task.datasets), folder.root, folder.dataset)
    return task.labels


def check_views(views: str) -> str:
    if views not in VIEW_FILTERS:
        raise ValueError(f"views must be one of {VIEW_FILTERS}, got {views!r}")
    return views
