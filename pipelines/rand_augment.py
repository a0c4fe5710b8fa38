"""RandAugment as timm writes it (`rand-m6-mstd0.5-inc1`), parsed once for both backends.

timm's `rand_augment_transform` (MAE-CXR's fine-tuning uses it through `create_transform`): `n`
layers per image (default 2), each an op chosen uniformly with replacement from the op set and
applied with probability `p` (default 0.5), at magnitude `m` out of 10 plus Gaussian noise of std
`mstd` per application, clipped to [0, 10]; `inc1` selects the ops whose severity increases with the
magnitude. The DataLoader reference runs timm's own transform; the DALI graph runs the same op set
with DALI's `auto_aug` augmentations (`cxrfast.pipelines.augment.rand_augment`). This module imports
neither.
"""

from __future__ import annotations

from dataclasses import dataclass

#: timm's magnitude scale: `m` is a level out of 10 (timm's _LEVEL_DENOM).
LEVEL_MAX = 10.0
#: Sections of a timm RandAugment string that cxrfast reproduces.
_SECTIONS = ("m", "n", "p", "mstd", "inc")


@dataclass(frozen=True, kw_only=True, slots=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string."""

    text: str  # the string it was parsed from (what timm's transform is built with)
    n: int = 2  # ops per image
    magnitude: float = LEVEL_MAX  # level of every op, out of 10
    magnitude_std: float = 0.0  # std of the Gaussian noise added to the level at each application
    prob: float = 0.5  # probability that a chosen op is applied
    increasing: bool = False  # the op set whose severity increases with the level (inc1)


def parse_rand_augment(text: str) -> RandAugmentSpec:
    """`rand-m6-mstd0.5-inc1` -> RandAugmentSpec; ValueError naming the section it cannot reproduce."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {text!r} must start with 'rand-' (timm's syntax, e.g. rand-m6-mstd0.5-inc1)")
    values: dict[str, float] = {}
    for part in parts[1:]:
        key = next((k for k in sorted(_SECTIONS, key=len, reverse=True) if part.startswith(k)), None)
        try:
            value = float(part[len(key):]) if key else None
        except ValueError:
            value = None
        if key is None or value is None:
            raise ValueError(f"RandAugment spec {text!r}: section {part!r} is not one of m<level>, n<ops>, p<prob>, "
                             "mstd<std>, inc<0|1> (mmax and t are not reproduced)")  # fmt: skip
        values[key] = value
    spec = RandAugmentSpec(
        text=text, n=int(values.get("n", 2)), magnitude=values.get("m", LEVEL_MAX),
        magnitude_std=values.get("mstd", 0.0), prob=values.get("p", 0.5), increasing=bool(values.get("inc", 0)),
    )  # fmt: skip
    if spec.n < 1 or not 0 <= spec.magnitude <= LEVEL_MAX or spec.magnitude_std < 0 or not 0 < spec.prob <= 1:
        raise ValueError(f"RandAugment spec {text!r}: needs n >= 1, 0 <= m <= {LEVEL_MAX:g}, mstd >= 0, 0 < p <= 1")
    if not spec.increasing:
        raise ValueError(f"RandAugment spec {text!r}: only timm's increasing op set (inc1) is reproduced")
    return spec
