"""Procedurally drawn chest radiographs whose findings leave a visible trace.

An image is drawn as a map of X-ray attenuation ("density") at a low working resolution
(long side `DRAW_LONG_SIDE`), tone-mapped like a processed radiograph (bone and tissue bright,
air dark), upscaled to the full size and given full-resolution detector noise. Everything
that is random comes from seeds: the patient's `Anatomy`, an image `Pose`, and one
`seed` from which the lung markings, each finding and the noise draw their own generators, so
that the same seed drawn with two label vectors gives two images that differ only by the
findings (which is how tests check that a finding leaves a trace).

Coordinates are normalised to the image (x to the right, y down). Frontal views are shown as
radiologists read them: the patient's right on the image's left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from cxrfast.shards.schema import LABEL_NAMES, NUM_LABELS

FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP")
LATERAL_VIEWS: tuple[str, ...] = ("LATERAL", "LL")
VIEWS: tuple[str, ...] = FRONTAL_VIEWS + LATERAL_VIEWS
#: Patient sides a finding can be on ("right" is the image's left on a frontal view).
SIDES: tuple[str, ...] = ("right", "left", "bilateral")
#: Long side of the canvas the anatomy is drawn on before upscaling.
DRAW_LONG_SIDE = 640

_IDX = {name: i for i, name in enumerate(LABEL_NAMES)}
NO_FINDING = _IDX["No Finding"]
ECM = _IDX["Enlarged Cardiomediastinum"]
CARDIOMEGALY = _IDX["Cardiomegaly"]
OPACITY = _IDX["Lung Opacity"]
LESION = _IDX["Lung Lesion"]
EDEMA = _IDX["Edema"]
CONSOLIDATION = _IDX["Consolidation"]
PNEUMONIA = _IDX["Pneumonia"]
ATELECTASIS = _IDX["Atelectasis"]
PNEUMOTHORAX = _IDX["Pneumothorax"]
EFFUSION = _IDX["Pleural Effusion"]
PLEURAL_OTHER = _IDX["Pleural Other"]
FRACTURE = _IDX["Fracture"]
DEVICES = _IDX["Support Devices"]
#: Findings drawn on one side of the chest (their side is part of the study's description).
SIDED_LABELS: tuple[str, ...] = (
    "Lung Opacity", "Lung Lesion", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
)  # fmt: skip

_SHIFT = 4  # sub-pixel bits for OpenCV drawing calls
_SCALE = 1 << _SHIFT
_TONE_K = 1.1  # intensity = 1 - exp(-k * density)


@dataclass(frozen=True, slots=True)
class Anatomy:
    """One patient's chest, normalised to a frontal image (distances are fractions of width/height)."""

    cx: float  # midline
    body_half_width: float  # midline to the skin
    lung_top: float  # apices
    lung_half_width: float  # midline to the lateral lung wall
    medi_half_width: float  # midline to the medial lung border (upper mediastinum)
    dome_right: float  # top of the right hemidiaphragm (image left); usually higher than the left
    dome_left: float
    sulcus_depth: float  # costophrenic angle below its dome
    heart_offset: float  # heart centre right of the midline (towards the patient's left)
    heart_half_width: float
    heart_half_height: float
    rib_thickness: float
    rib_spacing: float  # 1 = average
    tissue: float  # soft-tissue density
    air: float  # lung air (density removed inside the lungs)
    bone: float
    breast: float  # 0 for male patients
    exposure: float  # detector window, 1 = average
    gamma: float

    @classmethod
    def sample(cls, rng: np.random.Generator, *, female: bool = False) -> Anatomy:
        """A plausible adult chest."""
        u = rng.uniform
        dome_right = u(0.66, 0.74)
        half_w = u(0.30, 0.36)
        heart_hw = half_w * u(0.40, 0.48)  # cardiothoracic ratio ~0.40-0.48
        return cls(
            cx=0.5 + u(-0.02, 0.02),
            body_half_width=half_w + u(0.07, 0.13),
            lung_top=u(0.10, 0.16),
            lung_half_width=half_w,
            medi_half_width=u(0.05, 0.07),
            dome_right=dome_right,
            dome_left=dome_right + u(0.01, 0.04),
            sulcus_depth=u(0.04, 0.07),
            heart_offset=u(0.035, 0.06),
            heart_half_width=heart_hw,
            heart_half_height=u(0.12, 0.145),
            rib_thickness=u(0.014, 0.02),
            rib_spacing=u(0.92, 1.08),
            tissue=u(0.9, 1.1),
            air=u(0.76, 0.88),
            bone=u(0.11, 0.16),
            breast=u(0.12, 0.25) if female else 0.0,
            exposure=u(0.85, 1.1),
            gamma=u(0.85, 1.2),
        )

    def restudied(self, rng: np.random.Generator) -> Anatomy:
        """The same patient on another day: slightly different inspiration, exposure and gamma."""
        breath = rng.uniform(-0.025, 0.025)
        return _replace(
            self,
            dome_right=self.dome_right + breath,
            dome_left=self.dome_left + breath,
            exposure=self.exposure * rng.uniform(0.93, 1.07),
            gamma=self.gamma * rng.uniform(0.95, 1.05),
        )


def _replace(a: Anatomy, **changes: float) -> Anatomy:
    values = {f: getattr(a, f) for f in Anatomy.__slots__}
    values.update(changes)
    return Anatomy(**values)


@dataclass(frozen=True, slots=True)
class Pose:
    """How the patient sits in the frame: zoom about the centre, shift (fractions), rotation (degrees)."""

    zoom: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    angle: float = 0.0
    collimated: bool = False  # a bright unexposed border from the collimator

    @classmethod
    def sample(cls, rng: np.random.Generator, view: str) -> Pose:
        portable = view == "AP"
        return cls(
            zoom=float(rng.uniform(0.9, 1.08)),
            shift_x=float(rng.uniform(-0.03, 0.03)),
            shift_y=float(rng.uniform(-0.03, 0.03)),
            angle=float(rng.uniform(-4, 4) if portable else rng.uniform(-1.5, 1.5)),
            collimated=bool(rng.random() < (0.3 if portable else 0.12)),
        )


def severities(labels: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Label codes in CheXpert order (1, 0, -1, or -2/NaN for blank) -> how strongly each is drawn.

    Positive findings are drawn at 0.75-1.0, uncertain ones at 0.45 (subtle), others not at all.
    """
    codes = np.asarray(labels, dtype=np.float64)
    if codes.shape != (NUM_LABELS,):
        raise ValueError(f"expected {NUM_LABELS} label codes in CheXpert order, got shape {codes.shape}")
    strength = rng.uniform(0.75, 1.0, NUM_LABELS) if rng is not None else np.ones(NUM_LABELS)
    return np.where(codes == 1, strength, np.where(codes == -1, 0.45, 0.0))


def _finding_rng(seed: int, label: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1000 + label])


def _pick_side(sides: dict[str, str] | None, label: int, rng: np.random.Generator, *, bilateral: float) -> str:
    name = LABEL_NAMES[label]
    if sides and name in sides:
        side = sides[name]
        if side not in SIDES:
            raise ValueError(f"side of {name!r} must be one of {SIDES}, got {side!r}")
        return side
    r = rng.random()
    return "bilateral" if r < bilateral else ("right" if r < bilateral + (1 - bilateral) / 2 else "left")


def _signs(side: str) -> tuple[int, ...]:
    """Patient side -> sign of x offsets from the midline on a frontal image."""
    return {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}[side]


class _Canvas:
    """Drawing helpers on float32 canvases of one size, in normalised coordinates."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.short = min(h, w)
        self.yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
        self.xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w

    def zeros(self) -> np.ndarray:
        return np.zeros((self.h, self.w), np.float32)

    def pts(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        p = np.stack([np.asarray(xs) * self.w, np.asarray(ys) * self.h], axis=-1)
        return np.round(p * _SCALE).astype(np.int32)

    def px(self, frac: float) -> int:
        """A length as a fraction of the short side -> whole pixels (at least 1)."""
        return max(1, round(frac * self.short))

    def poly(self, img: np.ndarray, xs: np.ndarray, ys: np.ndarray, value: float = 1.0) -> np.ndarray:
        cv2.fillPoly(img, [self.pts(xs, ys)], float(value), cv2.LINE_AA, _SHIFT)
        return img

    def line(self, img: np.ndarray, xs, ys, thickness: float, value: float = 1.0) -> np.ndarray:
        """Polyline; `thickness` is a fraction of the short side."""
        cv2.polylines(img, [self.pts(xs, ys)], False, float(value), self.px(thickness), cv2.LINE_AA, _SHIFT)
        return img

    def ellipse(
        self, img: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, value: float = 1.0
    ) -> np.ndarray:
        """Filled ellipse; half axes `ax` (fraction of width) and `ay` (fraction of height)."""
        center = (round(cx * self.w * _SCALE), round(cy * self.h * _SCALE))
        axes = (max(1, round(ax * self.w * _SCALE)), max(1, round(ay * self.h * _SCALE)))
        cv2.ellipse(img, center, axes, angle, 0, 360, float(value), -1, cv2.LINE_AA, _SHIFT)
        return img

    def blur(self, img: np.ndarray, frac: float) -> np.ndarray:
        sigma = max(0.5, frac * self.short)
        return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)


# --------------------------------------------------------------------------- frontal views


def _lung_outline(a: Anatomy, s: int, dome: float, medial) -> tuple[np.ndarray, np.ndarray]:
    """Outline of one lung (sign s: -1 image left) from the apex down the lateral wall, along the
    diaphragm to the cardiophrenic angle and up the mediastinal border."""
    n = 48
    cpa = dome + a.sulcus_depth
    t = np.linspace(0.0, 1.0, n)
    top = a.lung_top
    m_top = medial(top)
    width = a.lung_half_width - m_top
    reach = np.sqrt(1.0 - (1.0 - np.minimum(t * 1.3, 1.0)) ** 2)
    x_wall = a.cx + s * (m_top + width * (0.3 + 0.7 * reach))
    y_wall = top + t * (cpa - top)
    u = np.linspace(0.0, 1.0, n)[1:]
    m_bot = medial(dome)
    x_dia = a.cx + s * (a.lung_half_width - (a.lung_half_width - m_bot) * u)
    y_dia = dome + (cpa - dome) * (1.0 - np.sin(np.pi * u) ** 0.8) * np.where(u < 0.5, 1.0, 0.6)
    y_med = np.linspace(y_dia[-1], top + 0.01, n)[1:]
    x_med = a.cx + s * np.array([medial(y) for y in y_med])
    return np.concatenate([x_wall, x_dia, x_med]), np.concatenate([y_wall, y_dia, y_med])


def _rib_paths(a: Anatomy, s: int, dome: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Posterior and anterior arcs of the ribs on one side: [(xs_post, ys_post, xs_ant, ys_ant)]."""
    paths = []
    span = (dome - a.lung_top + 0.08) * a.rib_spacing
    t = np.linspace(0.0, 1.0, 20)
    for k in range(10):
        y0 = a.lung_top - 0.03 + span * ((k + 0.2) / 10) ** 0.95
        reach = a.lung_half_width + 0.02
        xs = a.cx + s * (0.03 + (reach - 0.03) * t)
        ys = y0 - (0.025 + 0.004 * k) * np.sin(np.pi * t * 0.85) + 0.03 * t**3
        xa = a.cx + s * (reach - (reach - 0.13 - 0.01 * k) * t)
        ya = ys[-1] + (0.09 + 0.006 * k) * np.sin(np.pi / 2 * t) ** 1.3
        paths.append((xs, ys, xa, ya))
    return paths


def _blob(c: _Canvas, rng: np.random.Generator, cx: float, cy: float, radius: float) -> np.ndarray:
    """A patchy airspace opacity: overlapping ellipses, blurred (peak ~1)."""
    img = c.zeros()
    for _ in range(int(rng.integers(5, 10))):
        ox, oy = rng.normal(0, radius * 0.45, 2)
        r = radius * rng.uniform(0.3, 0.65)
        c.ellipse(img, cx + ox, cy + oy, r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3), rng.uniform(0, 180),
                  rng.uniform(0.6, 1.0))  # fmt: skip
    img = c.blur(img, radius * 0.25)
    return img / max(float(img.max()), 1e-6)


def _devices(c: _Canvas, a: Anatomy, rng: np.random.Generator, lateral: bool) -> np.ndarray:
    """Radio-opaque tubes, lines, leads and pacemakers (density, metal ~2); the caller scales it by severity."""
    d = c.zeros()
    kinds = list(
        rng.choice(["ett", "ngt", "cvc", "pacer", "ecg", "wires"], size=int(rng.integers(1, 4)), replace=False,
                   p=[0.24, 0.22, 0.24, 0.1, 0.12, 0.08]))  # fmt: skip
    top, carina = a.lung_top, a.lung_top + 0.2
    t = np.linspace(0.0, 1.0, 30)
    for kind in kinds:
        if kind == "ett":
            if lateral:
                xs, ys = 0.47 + 0.06 * t, -0.02 + (carina - 0.02) * t
            else:
                xs, ys = a.cx + 0.004 * np.sin(3 * t), -0.02 + (carina - 0.05) * t
            c.line(d, xs, ys, 0.011, 0.5)
            c.line(d, xs, ys, 0.004, 1.6)
        elif kind == "ngt":
            if lateral:
                xs, ys = 0.6 + 0.08 * t, -0.02 + 0.95 * t
            else:
                xs = a.cx + 0.01 + np.where(t < 0.7, 0.0, (t - 0.7) / 0.3 * 0.16)
                ys = -0.02 + (a.dome_left + 0.12) * np.minimum(t / 0.75, 1.0) + np.where(t > 0.75, 0.03 * (t - 0.75) * 4, 0)
            c.line(d, xs, ys, 0.006, 1.5)
        elif kind == "cvc":
            sx = -1 if rng.random() < 0.7 else 1
            if lateral:
                xs, ys = 0.3 + 0.2 * t, 0.05 + 0.3 * np.sin(np.pi / 2 * t)
            else:
                xs = a.cx + sx * (0.22 - 0.2 * np.sin(np.pi / 2 * t))
                ys = top - 0.02 + (0.27 * t**1.4)
            c.line(d, xs, ys, 0.005, 1.4)
        elif kind == "pacer":
            px, py = (0.3, 0.2) if lateral else (a.cx + 0.24, top + 0.06)
            c.ellipse(d, px, py, 0.035, 0.025, rng.uniform(-20, 20), 2.2)
            hx, hy = (0.4, 0.6) if lateral else (a.cx + a.heart_offset, a.dome_left - 0.08)
            for j in range(int(rng.integers(1, 3))):
                xs = px + (hx - px) * t + 0.03 * np.sin(np.pi * t) * (j + 1)
                ys = py + (hy - py) * t**0.8
                c.line(d, xs, ys, 0.004, 1.6)
        elif kind == "ecg":
            for _ in range(int(rng.integers(2, 5))):
                ex, ey = rng.uniform(0.15, 0.85), rng.uniform(0.05, 0.75)
                c.ellipse(d, ex, ey, 0.012, 0.012 * c.w / c.h, 0, 1.2)
                c.ellipse(d, ex, ey, 0.006, 0.006 * c.w / c.h, 0, 0.4)
                c.line(d, ex + rng.normal(0, 0.08, 4).cumsum() * t[:4] * 3, ey + np.linspace(0, 0.2, 4), 0.003, 0.8)
        else:  # sternotomy wires
            for k in range(5):
                y = top + 0.08 + 0.06 * k
                x = 0.23 if lateral else a.cx
                c.ellipse(d, x, y, 0.012, 0.008, rng.uniform(-15, 15), 2.0)
                c.ellipse(d, x, y, 0.007, 0.004, 0, 0.0)
    return d


def _box_opacity(c: _Canvas, rng: np.random.Generator, box: tuple[float, float, float, float]) -> np.ndarray:
    """A patchy airspace opacity filling the box (x0, y0, x1, y1), fading out at its edges (peak 1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    img = c.zeros()
    for _ in range(int(rng.integers(6, 11))):
        cx, cy = x0 + w * rng.uniform(0.3, 0.7), y0 + h * rng.uniform(0.3, 0.7)
        c.ellipse(img, cx, cy, w * rng.uniform(0.15, 0.3), h * rng.uniform(0.15, 0.3), rng.uniform(0, 180),
                  rng.uniform(0.6, 1.0))  # fmt: skip
    img = c.blur(img, 0.12 * min(w * c.w, h * c.h) / c.short)
    return img / max(float(img.max()), 1e-6)


def _frontal_density(c: _Canvas, a: Anatomy, sev: np.ndarray, view: str, seed: int,
                     sides: dict[str, str] | None,
                     opacities: Sequence[tuple[float, float, float, float]] = ()) -> np.ndarray:  # fmt: skip
    """Attenuation map of a PA/AP chest with the findings in `sev` (CheXpert order) and an airspace
    opacity filling each box of `opacities` (normalised x0, y0, x1, y1 before the pose)."""
    base = np.random.default_rng([seed, 1])
    ap = view == "AP"
    xx, yy = c.xx, c.yy
    cx = a.cx
    # --- geometry, changed by findings --------------------------------------------------------------
    atel_rng = _finding_rng(seed, ATELECTASIS)
    atel_side = _pick_side(sides, ATELECTASIS, atel_rng, bilateral=0.35) if sev[ATELECTASIS] else "bilateral"
    dome = {
        -1: a.dome_right - (0.03 if ap else 0.0) - (0.025 * sev[ATELECTASIS] if atel_side != "left" else 0.0),
        1: a.dome_left - (0.03 if ap else 0.0) - (0.025 * sev[ATELECTASIS] if atel_side != "right" else 0.0),
    }
    heart_bottom = a.dome_left - (0.03 if ap else 0.0) + 0.03
    grow = 1.0 + 0.42 * sev[CARDIOMEGALY]
    heart_hw = a.heart_half_width * grow * (1.08 if ap else 1.0)
    heart_hh = a.heart_half_height * (1.0 + 0.15 * sev[CARDIOMEGALY])
    heart_cx = cx + a.heart_offset + 0.25 * (heart_hw - a.heart_half_width)
    heart_cy = heart_bottom - heart_hh
    widen = 0.9 * sev[ECM]
    upper = a.lung_top + 0.05
    knob_y = a.lung_top + 0.13

    def medial(y: float, s: int = -1) -> float:
        """Midline to the medial lung border at height y (s=1: the image right, with the aortic knob)."""
        bump = math.exp(-(((y - (upper + 0.12)) / 0.11) ** 2))
        knob = 0.022 * math.exp(-(((y - knob_y) / 0.035) ** 2)) if s == 1 else 0.0
        return a.medi_half_width * (1.0 + widen * bump) + knob

    # --- body: a soft-tissue cylinder with sloping shoulders and a neck ---------------------------
    bw = a.body_half_width
    body = c.zeros()
    ys = np.array([-0.05, 0.02, 0.05, 0.09, 0.16, 0.3, 0.55, 0.8, 1.05])
    half = np.array([0.085, 0.09, bw * 0.7, bw * 0.95, bw * 1.02, bw, bw * 0.97, bw * 1.0, bw * 1.04])
    c.poly(body, np.concatenate([cx - half, (cx + half)[::-1]]), np.concatenate([ys, ys[::-1]]))
    body = c.blur(body, 0.012)
    cyl = np.sqrt(np.clip(1.0 - ((xx - cx) / (bw * 1.04)) ** 2, 0.0, 1.0))
    dens = body * ((0.15 + 0.85 * cyl**1.5) * a.tissue)
    arms = c.zeros()
    for s in (-1, 1):
        c.ellipse(arms, cx + s * (bw + 0.1), 0.32, 0.075, 0.42, s * 8, 1.0)
    dens += c.blur(arms, 0.02) * (0.55 * a.tissue)
    if a.breast > 0:
        br = c.zeros()
        for s in (-1, 1):
            c.ellipse(br, cx + s * (a.lung_half_width * 0.62), dome[s] + 0.01, 0.16, 0.1, 0, 1.0)
        dens += c.blur(br, 0.035) * a.breast
    # abdomen below the diaphragm is denser (liver, spleen); gastric bubble under the left dome
    dens += body * np.clip((yy - min(dome.values())) * 3.0, 0.0, 0.14)
    bubble = c.ellipse(c.zeros(), cx + 0.19, dome[1] + 0.06, 0.05, 0.026, 0, 1.0)
    dens -= c.blur(bubble, 0.008) * 0.35

    # --- lungs, mediastinum, heart ------------------------------------------------------------------
    lung_shape = c.zeros()
    for s in (-1, 1):
        lx, ly = _lung_outline(a, s, dome[s], lambda y, s=s: medial(y, s))
        c.poly(lung_shape, lx, ly)
    heart = c.zeros()
    c.ellipse(heart, heart_cx + 0.15 * heart_hw, heart_cy + 0.1 * heart_hh, heart_hw * 0.85, heart_hh, 28, 1.0)  # ventricles
    c.ellipse(heart, heart_cx - 0.45 * heart_hw, heart_cy + 0.15 * heart_hh, heart_hw * 0.55, heart_hh * 0.8, 0, 1.0)  # right atrium
    top_y = heart_cy - heart_hh * 0.7
    c.poly(heart, np.array([cx - 0.05, cx + 0.06, heart_cx + 0.4 * heart_hw, heart_cx - 0.7 * heart_hw]),
           np.array([top_y - 0.06, top_y - 0.06, top_y + 0.05, top_y + 0.05]))  # fmt: skip
    heart = c.blur(heart, 0.007)
    lung_shape = c.blur(lung_shape, 0.005)
    lung = lung_shape * (1.0 - heart)
    # air path: thickest in the middle of each lung, thinning towards its edges
    thick = np.sqrt(np.clip(c.blur(lung, 0.05), 0.0, 1.0))
    aerated = lung * (0.35 + 0.65 * thick) * a.air  # the density the air took away
    dens -= aerated
    dens += heart * 0.04
    # posterior lung bases seen through the dome: a little air below the diaphragm line
    # spine (faint through the mediastinum), trachea, bronchi, hila
    spine = c.zeros()
    y = a.lung_top - 0.14
    while y < 1.05:
        hgt = 0.032 + 0.018 * max(0.0, y - a.lung_top)
        c.poly(spine, np.array([cx - 0.03, cx + 0.03, cx + 0.032, cx - 0.032]), np.array([y, y, y + hgt, y + hgt]))
        for s in (-1, 1):
            c.ellipse(spine, cx + s * 0.022, y + hgt * 0.45, 0.0065, 0.008, 0, 1.5)
        y += hgt + 0.009
    dens += c.blur(spine, 0.003) * (0.35 * a.bone)
    carina = a.lung_top + 0.2
    trachea = c.zeros()
    c.line(trachea, np.array([cx, cx, cx + 0.004]), np.array([-0.05, 0.1, carina]), 0.03)
    for s in (-1, 1):
        c.line(trachea, np.array([cx + 0.004, cx + s * 0.05, cx + s * 0.075]), np.array([carina, carina + 0.04, carina + 0.08]), 0.016)
    dens -= c.blur(trachea, 0.005) * 0.22
    hila = c.zeros()
    for s in (-1, 1):
        c.ellipse(hila, cx + s * (medial(carina + 0.08, s) + 0.03), carina + 0.08, 0.03, 0.065, s * 10, 1.0)
    dens += c.blur(hila, 0.018) * 0.16 * lung_shape

    # lung markings: branching vessels from the hila, fading and thinning towards the periphery
    marks = c.zeros()
    for s in (-1, 1):
        hx, hy = cx + s * (a.medi_half_width + 0.035), carina + 0.08
        for _ in range(28):
            ang = base.uniform(-1.35, 1.45)
            x, y, th, val = hx, hy, 0.008, 1.0
            for _seg in range(7):
                step = base.uniform(0.028, 0.048)
                ang += base.normal(0, 0.22)
                nx, ny = x + s * math.cos(ang) * step * 0.9, y + math.sin(ang) * step
                c.line(marks, np.array([x, nx]), np.array([y, ny]), th, val)
                if base.random() < 0.4:
                    ba = ang + base.choice([-0.6, 0.6])
                    c.line(marks, np.array([nx, nx + s * math.cos(ba) * step * 0.8]),
                           np.array([ny, ny + math.sin(ba) * step * 0.8]), th * 0.6, val * 0.7)  # fmt: skip
                x, y, th, val = nx, ny, max(0.0015, th * 0.72), val * 0.8
    marks = c.blur(marks, 0.002 + 0.004 * sev[EDEMA])

    # ribs (posterior arcs bright, anterior arcs faint), clavicles, scapulae
    outer, inner, ant = c.zeros(), c.zeros(), c.zeros()
    frac_rng = _finding_rng(seed, FRACTURE)
    frac_side = _pick_side(sides, FRACTURE, frac_rng, bilateral=0.0)
    frac_rib = int(frac_rng.integers(3, 8))
    frac_at = int(frac_rng.integers(9, 15))
    for s in (-1, 1):
        for k, (xp, yp, xa, ya) in enumerate(_rib_paths(a, s, max(dome.values()))):
            if sev[FRACTURE] and k == frac_rib and s == _signs(frac_side)[0]:
                gap = 1 if sev[FRACTURE] < 0.6 else 2
                off = 0.004 + 0.006 * sev[FRACTURE]
                segs = [(xp[:frac_at], yp[:frac_at]), (xp[frac_at + gap :], yp[frac_at + gap :] + off)]
            else:
                segs = [(xp, yp)]
            for sx, sy in segs:
                c.line(outer, sx, sy, a.rib_thickness)
                c.line(inner, sx, sy, a.rib_thickness * 0.5)
            c.line(ant, xa, ya, a.rib_thickness * 0.85)
        t = np.linspace(0.0, 1.0, 16)
        clav_y = a.lung_top + (-0.01 if ap else 0.035)
        c.line(outer, cx + s * (0.04 + 0.3 * t), clav_y - 0.075 * t + 0.012 * np.sin(2 * np.pi * t), 0.026)
        c.line(inner, cx + s * (0.04 + 0.3 * t), clav_y - 0.075 * t + 0.012 * np.sin(2 * np.pi * t), 0.012)
        scap = c.zeros()
        sx0 = a.lung_half_width - (0.07 if ap else -0.01)
        c.poly(scap, cx + s * np.array([sx0, sx0 + 0.1, sx0 + 0.08, sx0 + 0.015]),
               np.array([a.lung_top, a.lung_top - 0.02, a.lung_top + 0.32, a.lung_top + 0.26]))  # fmt: skip
        dens += c.blur(scap, 0.012) * (0.1 if ap else 0.06)
    ribs = c.blur(outer - 0.45 * inner, 0.0025) + c.blur(ant, 0.005) * 0.4
    dens += ribs * a.bone

    # --- findings ----------------------------------------------------------------------------------------
    ptx_clear = np.ones_like(dens)
    if sev[PNEUMOTHORAX]:
        rng = _finding_rng(seed, PNEUMOTHORAX)
        side = _pick_side(sides, PNEUMOTHORAX, rng, bilateral=0.05)
        for s in _signs(side):
            gap = 0.025 + 0.06 * sev[PNEUMOTHORAX]
            lx, ly = _lung_outline(a, s, dome[s], lambda y, s=s: medial(y, s))
            wall = ly < a.lung_top + (0.25 + 0.25 * sev[PNEUMOTHORAX]) * (dome[s] - a.lung_top)
            wall &= np.arange(len(lx)) < 48
            wx, wy = lx[wall], ly[wall]
            fade = np.linspace(1.0, 0.0, len(wx)) ** 0.7
            ix = wx - s * gap * fade
            iy = wy + gap * fade * 0.6
            region = c.poly(c.zeros(), np.concatenate([wx, ix[::-1]]), np.concatenate([wy, iy[::-1]]))
            region = c.blur(region, 0.003)
            ptx_clear *= 1.0 - region
            dens -= region * lung_shape * 0.1
            c.line(dens, ix, iy, 0.0025, 0.0)  # erase, then draw the visceral pleural line
            dens += c.blur(c.line(c.zeros(), ix, iy, 0.002), 0.0015) * 0.22
    dens += marks * lung * ptx_clear * 0.09

    if sev[EFFUSION]:
        rng = _finding_rng(seed, EFFUSION)
        side = _pick_side(sides, EFFUSION, rng, bilateral=0.35)
        for s in _signs(side):
            cpa = dome[s] + a.sulcus_depth
            height = (0.04 + 0.2 * sev[EFFUSION] * rng.uniform(0.6, 1.0)) * (cpa - a.lung_top)
            u = np.linspace(0.0, 1.0, 30)
            mx = cx + s * (a.lung_half_width + 0.02 - (a.lung_half_width - a.medi_half_width) * u)
            my = cpa - height - (0.06 * sev[EFFUSION]) * (1.0 - u) ** 2  # meniscus: higher laterally
            fill = c.poly(c.zeros(), np.concatenate([mx, mx[::-1]]), np.concatenate([my, np.full_like(my, 1.05)]))
            fill = c.blur(fill, 0.012) * (yy > my.min() - 0.05)
            dens += fill * aerated * 0.97
    if sev[EDEMA]:
        haze = c.zeros()
        for s in (-1, 1):
            c.ellipse(haze, cx + s * (a.medi_half_width + 0.09), carina + 0.12, 0.11, 0.16, 0, 1.0)
        dens += c.blur(haze, 0.06) * aerated * (0.4 * sev[EDEMA])
        rng = _finding_rng(seed, EDEMA)
        kerley = c.zeros()
        for s in (-1, 1):
            for _ in range(8):
                ky = rng.uniform(dome[s] - 0.15, dome[s] - 0.02)
                kx = cx + s * (a.lung_half_width - rng.uniform(0.005, 0.02))
                c.line(kerley, np.array([kx, kx - s * 0.035]), np.array([ky, ky]), 0.0025)
        dens += kerley * lung * (0.12 * sev[EDEMA])
    for label, weight in ((OPACITY, 0.3), (PNEUMONIA, 0.4), (CONSOLIDATION, 0.5)):
        if sev[label]:
            rng = _finding_rng(seed, label)
            side = _pick_side(sides, label, rng, bilateral=0.2)
            for s in _signs(side):
                by = rng.uniform(a.lung_top + 0.3, dome[s] - 0.06) if label != OPACITY else rng.uniform(a.lung_top + 0.1, dome[s] - 0.05)
                bx = cx + s * rng.uniform(a.medi_half_width + 0.1, a.lung_half_width - 0.08)
                blob = _blob(c, rng, bx, by, rng.uniform(0.06, 0.1))
                dens += blob * aerated * (weight * sev[label] * 1.5)
                if label == CONSOLIDATION:  # air bronchograms
                    br = c.zeros()
                    for _ in range(3):
                        ang = rng.uniform(0, np.pi)
                        c.line(br, np.array([bx, bx + s * 0.05 * math.cos(ang)]), np.array([by, by + 0.05 * math.sin(ang)]), 0.004)
                    dens -= c.blur(br, 0.002) * blob * 0.15 * sev[label]
    if sev[LESION]:
        rng = _finding_rng(seed, LESION)
        s = _signs(_pick_side(sides, LESION, rng, bilateral=0.0))[0]
        ny = rng.uniform(a.lung_top + 0.1, dome[s] - 0.12)
        nx = cx + s * rng.uniform(a.medi_half_width + 0.08, a.lung_half_width - 0.06)
        r = rng.uniform(0.012, 0.03) * (0.6 + 0.4 * sev[LESION])
        nod = c.blur(c.ellipse(c.zeros(), nx, ny, r * c.short / c.w, r * c.short / c.h, 0, 1.0), 0.002)
        dens += nod * (0.75 * a.air + 0.1)
    if sev[ATELECTASIS]:
        rng = _finding_rng(seed, ATELECTASIS)
        for s in _signs(atel_side):
            band = c.zeros()
            by = dome[s] - rng.uniform(0.04, 0.1)
            bx = cx + s * rng.uniform(a.medi_half_width + 0.1, a.lung_half_width - 0.1)
            c.ellipse(band, bx, by, rng.uniform(0.08, 0.13), 0.011, rng.uniform(-12, 12), 1.0)
            dens += c.blur(band, 0.006) * aerated * (0.7 * sev[ATELECTASIS])
    if sev[PLEURAL_OTHER]:
        rng = _finding_rng(seed, PLEURAL_OTHER)
        for s in _signs(_pick_side(sides, PLEURAL_OTHER, rng, bilateral=0.4)):
            lx, ly = _lung_outline(a, s, dome[s], lambda y, s=s: medial(y, s))
            seg = slice(22, 46)
            thick = c.line(c.zeros(), lx[seg] - s * 0.008, ly[seg], 0.014)
            dens += c.blur(thick, 0.004) * (0.45 * a.air * sev[PLEURAL_OTHER])
    for i, box in enumerate(opacities):
        dens += _box_opacity(c, np.random.default_rng([seed, 2000 + i]), box) * aerated * 0.65
    if sev[DEVICES]:
        dens += _devices(c, a, _finding_rng(seed, DEVICES), lateral=False) * min(1.0, sev[DEVICES] * 1.2)
    return dens


# --------------------------------------------------------------------------- lateral views


def _lateral_density(c: _Canvas, a: Anatomy, sev: np.ndarray, view: str, seed: int,
                     sides: dict[str, str] | None) -> np.ndarray:  # fmt: skip
    """Attenuation map of a lateral chest (patient facing the image's left: sternum left, spine right)."""
    base = np.random.default_rng([seed, 1])
    xx, yy = c.xx, c.yy
    depth = a.body_half_width * 2.0 * 0.8  # antero-posterior diameter
    front = 0.5 - depth / 2 + (a.cx - 0.5)
    back = front + depth
    top = a.lung_top + 0.03
    dome = a.dome_right + 0.02
    # body: chest seen side-on; thick (both shoulders and arms) at the top
    body = c.zeros()
    c.poly(body, np.array([front + 0.2, back - 0.12, back - 0.02, back + 0.01, back + 0.02, front - 0.03, front - 0.01, front + 0.03, front + 0.1]),
           np.array([-0.05, -0.05, 0.08, 0.35, 1.05, 1.05, 0.6, 0.25, 0.08]))  # fmt: skip
    body = c.blur(body, 0.012)
    across = np.clip(1.0 - np.abs(xx - (front + back) / 2) / (depth * 0.75), 0.3, 1.0) ** 0.5
    dens = body * (1.15 * a.tissue) * across
    shoulders = c.blur(c.ellipse(c.zeros(), (front + back) / 2 + 0.03, top - 0.02, depth * 0.45, 0.14, 0, 1.0), 0.05)
    dens += shoulders * 0.35
    arms = c.blur(c.ellipse(c.zeros(), front + 0.1, top + 0.02, 0.16, 0.09, -20, 1.0), 0.03)
    dens += arms * (0.3 * a.tissue)
    dens += body * np.clip((yy - dome) * 3.0, 0.0, 0.14)

    # lungs (both, superimposed), heart in front and below, spine behind
    grow = 1.0 + 0.32 * sev[CARDIOMEGALY]
    heart_hw, heart_hh = 0.12 * grow, 0.14 * (1.0 + 0.1 * sev[CARDIOMEGALY])
    heart_cx = front + 0.06 + heart_hw * 0.9
    heart_cy = dome + 0.03 - heart_hh
    cpa_post = dome + a.sulcus_depth + 0.07
    ant_x, post_x = front + 0.05, back - 0.15
    u = np.linspace(0.0, 1.0, 40)
    arc = np.linspace(np.pi, 0.0, 20)
    apex_l, apex_r = ant_x + 0.14, post_x - 0.08
    lx = np.concatenate([
        ant_x + 0.14 - 0.14 * np.sqrt(u),  # anterior border, apex down behind the sternum
        ant_x + (post_x - ant_x) * u,  # diaphragm, anterior to the posterior sulcus
        post_x + 0.015 * np.sin(np.pi * u) - 0.08 * u**4,  # posterior border, up to the apex
        (apex_l + apex_r) / 2 - (apex_r - apex_l) / 2 * np.cos(arc[::-1]),  # the apices' dome
    ])  # fmt: skip
    ly = np.concatenate([
        top + (dome + 0.01 - top) * u,
        dome + 0.01 - 0.04 * np.sin(np.pi * u * 0.7) + (cpa_post - dome - 0.01) * u**3,
        cpa_post - (cpa_post - top) * u,
        top - 0.06 * np.sin(arc),
    ])  # fmt: skip
    lung_shape = c.blur(c.poly(c.zeros(), lx, ly), 0.006)
    heart = c.blur(c.ellipse(c.zeros(), heart_cx, heart_cy, heart_hw, heart_hh, -30, 1.0), 0.01)
    lung = lung_shape * (1.0 - 0.5 * heart)
    thick = np.sqrt(np.clip(c.blur(lung_shape, 0.05), 0.0, 1.0))
    aerated = lung * (0.3 + 0.7 * thick) * (0.95 * a.air)
    dens -= aerated
    dens += heart * 0.05
    if sev[ECM]:  # widened superior mediastinum: the retrosternal space fills in
        ecm = c.ellipse(c.zeros(), (ant_x + post_x) / 2 - 0.02, top + 0.15, 0.09 * sev[ECM] + 0.03, 0.11, 0, 1.0)
        dens += c.blur(ecm, 0.02) * lung_shape * (0.5 * a.air * sev[ECM])
    spine = c.zeros()
    y = -0.02
    sx = back - 0.17
    while y < 1.05:
        hgt = 0.035 + 0.02 * y
        c.poly(spine, np.array([sx, sx + 0.075, sx + 0.08, sx + 0.004]), np.array([y, y + 0.004, y + hgt, y + hgt]))
        y += hgt + 0.011
    c.poly(spine, np.array([sx + 0.075, sx + 0.12, sx + 0.12, sx + 0.075]), np.array([-0.05, -0.05, 1.05, 1.05]), 0.35)
    dens += c.blur(spine, 0.003) * (1.5 * a.bone)
    sternum = c.line(c.zeros(), np.array([front + 0.035, front + 0.05, front + 0.075]), np.array([top + 0.04, top + 0.2, top + 0.45]), 0.016)
    sternum = c.blur(sternum, 0.003)
    trachea = c.line(c.zeros(), np.array([front + depth * 0.45, front + depth * 0.55]), np.array([-0.05, top + 0.22]), 0.032)
    dens -= c.blur(trachea, 0.006) * 0.28
    dens += c.blur(c.ellipse(c.zeros(), front + depth * 0.55, top + 0.3, 0.05, 0.07, 0, 1.0), 0.02) * 0.14  # hila
    marks = c.zeros()
    for _ in range(40):
        x, y = base.uniform(ant_x + 0.05, post_x - 0.03), base.uniform(top + 0.08, dome - 0.03)
        ang = base.uniform(0, 2 * np.pi)
        c.line(marks, np.array([x, x + 0.04 * math.cos(ang)]), np.array([y, y + 0.04 * math.sin(ang)]), 0.003, 0.8)
    dens += c.blur(marks, 0.003) * lung * 0.07
    ribs = c.zeros()
    t = np.linspace(0.0, 1.0, 16)
    for k in range(9):
        ry = top + 0.02 + k * 0.065
        c.line(ribs, sx + 0.02 - 0.3 * t, ry + 0.1 * t + 0.03 * np.sin(np.pi * t), a.rib_thickness * 0.8)
    dens += c.blur(ribs, 0.004) * (0.35 * a.bone)

    # findings
    if sev[EFFUSION]:  # fluid fills the posterior costophrenic sulcus first, with a meniscus
        rng = _finding_rng(seed, EFFUSION)
        level = cpa_post - (0.05 + 0.16 * sev[EFFUSION] * rng.uniform(0.6, 1.0))
        u = np.linspace(0.0, 1.0, 30)
        mx = post_x + 0.03 - 0.35 * u
        my = level - 0.05 * sev[EFFUSION] * (1.0 - u) ** 2 + 0.06 * u**2
        fill = c.poly(c.zeros(), np.concatenate([mx, mx[::-1]]), np.concatenate([my, np.full_like(my, 1.05)]))
        dens += c.blur(fill, 0.012) * aerated * 0.95
    if sev[EDEMA]:
        haze = c.blur(c.ellipse(c.zeros(), front + depth * 0.55, top + 0.32, 0.16, 0.18, 0, 1.0), 0.05)
        dens += haze * aerated * (0.4 * sev[EDEMA])
    for label, weight in ((OPACITY, 0.35), (PNEUMONIA, 0.45), (CONSOLIDATION, 0.55), (ATELECTASIS, 0.4)):
        if sev[label]:
            rng = _finding_rng(seed, label)
            bx, by = rng.uniform(ant_x + 0.12, post_x - 0.08), rng.uniform(top + 0.25, dome - 0.04)
            if label == ATELECTASIS:  # a plate-like band
                band = c.ellipse(c.zeros(), bx, by, 0.1, 0.01, rng.uniform(-15, 15), 1.0)
                dens += c.blur(band, 0.006) * aerated * (0.8 * sev[label])
            else:
                dens += _blob(c, rng, bx, by, rng.uniform(0.05, 0.08)) * aerated * (weight * sev[label] * 1.5)
    if sev[LESION]:
        rng = _finding_rng(seed, LESION)
        r = rng.uniform(0.015, 0.03) * (0.6 + 0.4 * sev[LESION])
        nx, ny = rng.uniform(ant_x + 0.12, post_x - 0.08), rng.uniform(top + 0.1, dome - 0.12)
        nod = c.ellipse(c.zeros(), nx, ny, r * c.short / c.w, r * c.short / c.h, 0, 1.0)
        dens += c.blur(nod, 0.002) * (0.8 * a.air + 0.1)
    if sev[PNEUMOTHORAX]:  # anterior air collection with a visible pleural edge
        rng = _finding_rng(seed, PNEUMOTHORAX)
        px, py = ant_x + 0.06, top + 0.12
        region = c.blur(c.ellipse(c.zeros(), px, py, 0.045 + 0.03 * sev[PNEUMOTHORAX], 0.1, 15, 1.0), 0.006)
        marks_clear = region * lung
        dens -= marks_clear * 0.15 * sev[PNEUMOTHORAX]
        edge = np.linspace(-np.pi / 2, np.pi / 2, 20)
        c.line(dens, px + (0.045 + 0.03 * sev[PNEUMOTHORAX]) * np.cos(edge), py + 0.1 * np.sin(edge), 0.002, 0.45)
    if sev[PLEURAL_OTHER]:
        thick_line = c.line(c.zeros(), lx[80:115] - 0.01, ly[80:115], 0.016)
        dens += c.blur(thick_line, 0.004) * (0.55 * a.air * sev[PLEURAL_OTHER])
    if sev[FRACTURE]:  # a sternal step-off
        rng = _finding_rng(seed, FRACTURE)
        fy = rng.uniform(0.25, 0.7)
        ts = np.linspace(0.0, 1.0, 40)
        sx_, sy_ = front + 0.035 + 0.04 * ts, top + 0.04 + 0.41 * ts
        cut = ts > fy
        sternum = c.zeros()
        c.line(sternum, sx_[~cut], sy_[~cut], 0.016)
        c.line(sternum, sx_[cut][2:] + 0.012 * sev[FRACTURE], sy_[cut][2:], 0.016)
        sternum = c.blur(sternum, 0.003)
    dens += sternum * (2.0 * a.bone)
    if sev[DEVICES]:
        dens += _devices(c, a, _finding_rng(seed, DEVICES), lateral=True) * min(1.0, sev[DEVICES] * 1.2)
    return dens


# --------------------------------------------------------------------------- tone, pose, upscale, noise


def _pose_matrix(pose: Pose, h: int, w: int) -> np.ndarray:
    m = cv2.getRotationMatrix2D((w / 2, h / 2), pose.angle, pose.zoom)
    m[0, 2] += pose.shift_x * w
    m[1, 2] += pose.shift_y * h
    return m


def posed_box(box: tuple[float, float, float, float], pose: Pose, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where a normalised box (x0, y0, x1, y1) drawn before the pose lies in the posed image of
    `shape` (height, width): the bounding box of its moved corners, in pixels (x0, y0, x1, y1),
    clipped to the image."""
    h, w = shape
    x0, y0, x1, y1 = box
    corners = np.array([[x0 * w, y0 * h, 1.0], [x1 * w, y0 * h, 1.0], [x0 * w, y1 * h, 1.0], [x1 * w, y1 * h, 1.0]])
    moved = corners @ _pose_matrix(pose, h, w).T
    lo = np.clip(moved.min(axis=0), 0, [w, h])
    hi = np.clip(moved.max(axis=0), 0, [w, h])
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def render(
    anatomy: Anatomy,
    labels: np.ndarray,
    view: str,
    shape: tuple[int, int],
    *,
    seed: int,
    sides: dict[str, str] | None = None,
    pose: Pose | None = None,
    markers: bool = True,
    opacities: Sequence[tuple[float, float, float, float]] = (),
) -> np.ndarray:
    """Draw one radiograph at its working resolution (long side <= DRAW_LONG_SIDE).

    labels: 14 codes in CheXpert order (1 positive, 0 negative, -1 uncertain, -2 or NaN blank).
    shape: the final (height, width); the result has the same aspect ratio.
    opacities: boxes (x0, y0, x1, y1, normalised, before the pose; frontal views only) each filled
    with an airspace opacity (RSNA's pneumonia boxes); `posed_box` says where one ends up.
    Returns float32 intensities in [0, 1] (bright = attenuating).
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if opacities and view not in FRONTAL_VIEWS:
        raise ValueError(f"opacity boxes are drawn on frontal views only, got view {view!r}")
    for box in opacities:
        if len(box) != 4 or not (0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0):
            raise ValueError(f"an opacity box is (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1; got {box}")
    height, width = shape
    if height < 32 or width < 32:
        raise ValueError(f"image too small: {shape}")
    scale = min(1.0, DRAW_LONG_SIDE / max(height, width))
    c = _Canvas(max(32, round(height * scale)), max(32, round(width * scale)))
    sev = severities(labels, np.random.default_rng([seed, 3]))
    if view in FRONTAL_VIEWS:
        dens = _frontal_density(c, anatomy, sev, view, seed, sides, opacities)
    else:
        dens = _lateral_density(c, anatomy, sev, view, seed, sides)
    pose = pose or Pose()
    if pose != Pose():
        m = _pose_matrix(pose, c.h, c.w)
        dens = cv2.warpAffine(dens, m, (c.w, c.h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    img = 1.0 - np.exp(-_TONE_K * np.maximum(dens, 0.0))
    img = np.clip(img / (0.85 * anatomy.exposure), 0.0, 1.0) ** anatomy.gamma
    if pose.collimated:
        rng = np.random.default_rng([seed, 4])
        x0, x1 = rng.uniform(0.0, 0.06, 2)
        y0, y1 = rng.uniform(0.0, 0.05, 2)
        inside = ((c.xx > x0) & (c.xx < 1 - x1)) & ((c.yy > y0) & (c.yy < 1 - y1))
        img = np.where(inside, img, np.float32(rng.uniform(0.75, 0.92)))
    if markers:  # burned-in side marker; "PORTABLE" on bedside films (putText draws on 8-bit only)
        font_scale = c.short / 700
        thick = max(1, round(c.short / 300))
        text = np.zeros((c.h, c.w), np.uint8)
        if view in FRONTAL_VIEWS:
            org = (round(c.w * 0.86), round(c.h * 0.08))
            cv2.putText(text, "L", org, cv2.FONT_HERSHEY_SIMPLEX, 1.6 * font_scale, 255, thick, cv2.LINE_AA)
        if view == "AP":
            org = (round(c.w * 0.05), round(c.h * 0.06))
            cv2.putText(text, "PORTABLE", org, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 255, thick, cv2.LINE_AA)
        img = np.maximum(img, text.astype(np.float32) * np.float32(0.95 / 255))
    return np.ascontiguousarray(img, dtype=np.float32)


def upscale_8bit(img: np.ndarray, shape: tuple[int, int], *, seed: int, noise: float = 2.2) -> np.ndarray:
    """Working-resolution intensities -> full-resolution uint8 with detector noise and grain.

    The upscale and the noise run in int16 fixed point (1/32 of a grey level), which keeps a
    2500-pixel image well under a tenth of a second.
    """
    height, width = shape
    rng = np.random.default_rng([seed, 2])
    fixed = (np.clip(img, 0.0, 1.0) * (255 * 32)).astype(np.uint16)
    up = cv2.resize(fixed, (width, height), interpolation=cv2.INTER_LINEAR).view(np.int16)
    gh, gw = (height + 1) // 2, (width + 1) // 2
    grain = rng.standard_normal((gh, gw), dtype=np.float32) * np.float32(noise * 32 * 0.8)
    grain = cv2.resize(grain.astype(np.int16), (width, height), interpolation=cv2.INTER_LINEAR)
    fine = rng.integers(-round(noise * 32), round(noise * 32) + 1, size=(height, width), dtype=np.int16)
    up += grain
    up += fine
    np.maximum(up, 0, out=up)
    return cv2.convertScaleAbs(up, alpha=1.0 / 32)


def upscale_16bit(img: np.ndarray, shape: tuple[int, int], *, seed: int) -> np.ndarray:
    """Working-resolution intensities -> full-resolution uint16 as a 12-bit detector stores them.

    The stored range is a random window inside 0..4095 with a non-linear (log-like) response,
    so an 8-bit view needs real windowing, not a shift by 4 or 8 bits.
    """
    height, width = shape
    rng = np.random.default_rng([seed, 2])
    lo, hi = rng.uniform(40, 600), rng.uniform(3000, 4095)
    up = cv2.resize(np.clip(img, 0.0, 1.0), (width, height), interpolation=cv2.INTER_LINEAR)
    response = np.log1p(up * 6.0) / np.log1p(np.float32(6.0))
    vals = lo + (hi - lo) * response + rng.standard_normal((height, width), dtype=np.float32) * np.float32(9.0)
    return np.clip(np.rint(vals), 0, 4095).astype(np.uint16)


def draw_radiograph(
    anatomy: Anatomy,
    labels: np.ndarray,
    view: str,
    shape: tuple[int, int],
    *,
    seed: int,
    sides: dict[str, str] | None = None,
    pose: Pose | None = None,
    bits: int = 8,
    opacities: Sequence[tuple[float, float, float, float]] = (),
) -> np.ndarray:
    """A full-resolution radiograph (uint8, or uint16 with bits=16) of `shape` (height, width);
    `opacities` as in `render`."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    img = render(anatomy, labels, view, shape, seed=seed, sides=sides, pose=pose, opacities=opacities)
    return upscale_8bit(img, shape, seed=seed) if bits == 8 else upscale_16bit(img, shape, seed=seed)
