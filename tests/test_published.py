"""docs/recipes.md, the presets and the published values in cxrfast.published agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrfast.config import apply_overrides
from cxrfast.presets import PRESETS, get_preset
from cxrfast.published import PUBLISHED, Knob, disagreements, main, missing_recipes, render

REPO = Path(__file__).resolve().parents[1]


def test_docs_recipes_md_is_the_generated_table():
    assert (REPO / "docs" / "recipes.md").read_text() == render(), (
        "docs/recipes.md is stale: run `python -m cxrfast.published --write docs/recipes.md`")


def test_every_published_preset_has_a_recipe(monkeypatch):
    assert missing_recipes() == []
    monkeypatch.setitem(PRESETS, "simclr_r50", PRESETS["tiny_mae"])
    assert missing_recipes() == ["preset 'simclr_r50' has no PublishedRecipe in cxrfast/published.py"]


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_holds_the_published_values(preset: str):
    assert disagreements(PUBLISHED[preset]) == []


def test_a_drifted_preset_is_named_with_the_knob_and_its_source():
    drifted = apply_overrides(get_preset("mrm_vitb"), [
        "method.mask_ratio=0.8", "train.batch_size=32", "method.mlm_replace_mask=0.8", "method.mlm_replace_random=0.1",
    ])
    found = disagreements(PUBLISHED["mrm_vitb"], drifted)
    assert "mrm_vitb: mask ratio (RL4M/MRM-pytorch run.sh:7): method.mask_ratio is 0.8, published 0.75" in found
    assert any(m.startswith("mrm_vitb: micro-batch per GPU") and "declared a difference" in m for m in found)
    assert any("[MASK]" in m and "published 1" in m for m in found)
    flagged = {m.removeprefix("mrm_vitb: ").split(" (RL4M")[0] for m in found}  # the rest still agrees
    assert flagged == {"mask ratio", "micro-batch per GPU", "MLM: masked tokens written as [MASK]",
                       "MLM: masked tokens replaced by a random id"}


def test_check_and_write(tmp_path: Path, capsys):
    table = tmp_path / "recipes.md"
    table.write_text("hand-edited\n")
    assert main(["--check", str(table)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert main(["--write", str(table)]) == 0 and table.read_text() == render()
    assert main(["--check", str(table)]) == 0


def test_knob_declarations_are_checked():
    with pytest.raises(ValueError, match="give `config`"):
        Knob(name="x", published=1, source="a.py:1")
    with pytest.raises(ValueError, match="needs its `switch`"):
        Knob(name="x", published=1, source="a.py:1", config="optim.epochs", differs="why")
    with pytest.raises(ValueError, match="key=value"):
        Knob(name="x", published=1, source="a.py:1", config="optim.epochs", switch=("epochs",))
