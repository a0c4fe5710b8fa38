"""Free-text radiology reports in MIMIC-CXR's style, consistent with a study's labels.

Each report is laid out as the `sNNNNNNNN.txt` files of mimic-cxr-reports.zip: a centred
"FINAL REPORT" line, upper-case section headers, text wrapped at 70-80 columns with a leading
space, `___` where the de-identification removed something, and the awkward cases a section
splitter must survive (a missing FINDINGS or IMPRESSION, `FINDINGS AND IMPRESSION:`, an
`IMPRESSION` header without colon on its own line, `CONCLUSION:`, a WET READ preamble, extra
NOTIFICATION / RECOMMENDATION(S) sections, older header-less layouts, mixed-case headers).
"""

from __future__ import annotations

import textwrap

import numpy as np

from cxrfast.shards.schema import LABEL_NAMES

#: Report layouts and how often each occurs.
STYLES: dict[str, float] = {
    "standard": 0.55,
    "impression_only": 0.12,  # no FINDINGS section
    "findings_only": 0.09,  # no IMPRESSION section
    "findings_and_impression": 0.05,  # one combined "FINDINGS AND IMPRESSION:" section
    "impression_no_colon": 0.04,  # "IMPRESSION" alone on its line
    "conclusion": 0.03,  # "CONCLUSION:" instead of IMPRESSION
    "wet_read": 0.04,  # a WET READ preamble before FINAL REPORT
    "old": 0.05,  # older layout: procedure line + HISTORY, no EXAMINATION/TECHNIQUE
    "mixed_case": 0.03,  # "Findings:" / "Impression:"
}

_POSITIVE: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        "The cardiomediastinal silhouette is widened.",
        "There is widening of the mediastinum.",
        "Enlarged cardiomediastinal silhouette.",
    ),
    "Cardiomegaly": (
        "The heart is moderately enlarged.",
        "Mild cardiomegaly is unchanged.",
        "There is moderate to severe cardiomegaly.",
    ),
    "Lung Opacity": (
        "There is patchy opacity in the {side} {zone}.",
        "Hazy opacity is seen at the {side} {zone}.",
        "Increased opacity projects over the {side} {zone}.",
    ),
    "Lung Lesion": (
        "A {size} mm nodule is seen in the {side} {zone}.",
        "There is a rounded mass in the {side} {zone} measuring {size} mm.",
        "Nodular opacity in the {side} {zone} is again seen.",
    ),
    "Edema": (
        "There is mild pulmonary edema.",
        "Moderate pulmonary edema with perihilar haziness and vascular congestion.",
        "Interstitial edema has worsened.",
    ),
    "Consolidation": (
        "There is focal consolidation in the {side} lower lobe.",
        "Dense consolidation at the {side} base with air bronchograms.",
    ),
    "Pneumonia": (
        "Findings are consistent with pneumonia in the {side} lower lobe.",
        "Opacity in the {side} {zone} is compatible with pneumonia.",
    ),
    "Atelectasis": (
        "Plate-like atelectasis at the {side} base.",
        "There is {side} basilar atelectasis.",
        "Linear opacity at the {side} base is compatible with subsegmental atelectasis.",
    ),
    "Pneumothorax": (
        "There is a small {side} apical pneumothorax.",
        "A moderate {side} pneumothorax is present.",
    ),
    "Pleural Effusion": (
        "There is a small {side} pleural effusion.",
        "Moderate {side} pleural effusion with blunting of the costophrenic angle.",
        "{Side} pleural effusion has increased.",
    ),
    "Pleural Other": (
        "There is {side} pleural thickening.",
        "Calcified pleural plaques on the {side}.",
    ),
    "Fracture": (
        "There is a displaced fracture of the {side} {rib} rib.",
        "Healing fracture of the {side} {rib} rib is noted.",
    ),
    "Support Devices": (
        "Endotracheal tube terminates ___ cm above the carina.",
        "Right internal jugular central venous catheter tip is in the mid SVC.",
        "Enteric tube courses below the diaphragm with the tip in the stomach.",
        "Left-sided pacemaker with leads in the right atrium and right ventricle.",
        "Median sternotomy wires are intact.",
    ),
}
_UNCERTAIN: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": ("The mediastinum may be slightly widened.",),
    "Cardiomegaly": ("The heart is possibly mildly enlarged.", "Borderline cardiomegaly."),
    "Lung Opacity": ("There may be a subtle opacity in the {side} {zone}.",),
    "Lung Lesion": ("A possible nodule in the {side} {zone} cannot be excluded.",),
    "Edema": ("Mild pulmonary edema cannot be excluded.", "Possible mild interstitial edema."),
    "Consolidation": ("Consolidation at the {side} base cannot be excluded.",),
    "Pneumonia": ("Opacity at the {side} base could represent pneumonia.", "Pneumonia cannot be excluded."),
    "Atelectasis": ("Opacity at the {side} base likely reflects atelectasis.", "Possible {side} basilar atelectasis."),
    "Pneumothorax": ("A tiny {side} apical pneumothorax cannot be excluded.",),
    "Pleural Effusion": ("Possible small {side} pleural effusion.", "Trace {side} effusion cannot be excluded."),
    "Pleural Other": ("Possible {side} pleural thickening.",),
    "Fracture": ("Possible fracture of the {side} {rib} rib.",),
    "Support Devices": ("A possible line projects over the neck.",),
}
_NEGATIVE: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": ("The mediastinal contours are normal.",),
    "Cardiomegaly": ("Heart size is normal.", "The heart is not enlarged."),
    "Lung Opacity": ("The lungs are clear.",),
    "Lung Lesion": ("No pulmonary nodules or masses.",),
    "Edema": ("No pulmonary edema.", "There is no pulmonary vascular congestion."),
    "Consolidation": ("No focal consolidation.",),
    "Pneumonia": ("No evidence of pneumonia.",),
    "Atelectasis": ("No atelectasis.",),
    "Pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "Pleural Effusion": ("No pleural effusion.", "No pleural effusions."),
    "Pleural Other": ("No pleural thickening.",),
    "Fracture": ("No acute fracture.", "No displaced rib fracture is seen."),
    "Support Devices": ("No lines or tubes.",),
}
_INDICATIONS = (
    "___ year old woman with shortness of breath.",
    "___ year old man with cough and fever, evaluate for pneumonia.",
    "___M with chest pain.",
    "___F with new onset ascites  // eval for infection",
    "History: ___M with hypoxia",
    "Evaluate ET tube placement.",
    "___-year-old with CHF exacerbation.",
    "Status post line placement.",
    "Preop.",
)
_ZONES = ("lower lobe", "upper lobe", "mid lung", "lung base", "perihilar region")
_RIBS = ("fifth", "sixth", "seventh", "eighth", "posterior ninth", "lateral fourth")
_SIDE_WORD = {"right": "right", "left": "left", "bilateral": "bilateral"}
_PLURALS = (
    ("a small bilateral pleural effusion", "small bilateral pleural effusions"),
    ("Bilateral pleural effusion has", "Bilateral pleural effusions have"),
    ("bilateral pleural effusion", "bilateral pleural effusions"),
    ("the bilateral lower lobe", "both lower lobes"),
    ("the bilateral upper lobe", "both upper lobes"),
    ("the bilateral base", "both bases"),
    ("the bilateral lung base", "both lung bases"),
    ("the bilateral mid lung", "both mid lungs"),
    ("the bilateral perihilar region", "both perihilar regions"),
    ("on the bilateral.", "bilaterally."),
    ("the bilateral ", "both "),
)
#: Sentences that mention no label, to give findings their usual length.
_FILLER = (
    "PA and lateral views of the chest provided.",
    "The lungs are well expanded.",
    "Hilar contours are unremarkable.",
    "The imaged upper abdomen is unremarkable.",
    "Degenerative changes are noted in the thoracic spine.",
    "Surgical clips project over the left upper quadrant.",
)


def _fill(template: str, side: str, rng: np.random.Generator) -> str:
    word = _SIDE_WORD.get(side, "right")
    text = template.format(
        side=word,
        Side=word.capitalize(),
        zone=str(rng.choice(_ZONES)),
        size=int(rng.integers(6, 35)),
        rib=str(rng.choice(_RIBS)),
    )
    if side == "bilateral":
        for one, both in _PLURALS:
            text = text.replace(one, both)
    return text


def sample_style(rng: np.random.Generator) -> str:
    names = list(STYLES)
    p = np.array([STYLES[n] for n in names])
    return str(rng.choice(names, p=p / p.sum()))


def mentions(labels: np.ndarray, sides: dict[str, str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(sentences for FINDINGS, sentences for IMPRESSION) that state the labels.

    Positive findings are stated, uncertain ones hedged, negative ones denied; blank labels
    are not mentioned. The impression repeats the positive and uncertain statements.
    """
    findings: list[str] = []
    impression: list[str] = []
    negatives: list[str] = []
    for i, name in enumerate(LABEL_NAMES):
        value = labels[i]
        if name == "No Finding" or np.isnan(value):
            continue
        side = sides.get(name, "right")
        if value == 1.0:
            text = _fill(str(rng.choice(_POSITIVE[name])), side, rng)
            findings.append(text)
            impression.append(text)
        elif value == -1.0:
            text = _fill(str(rng.choice(_UNCERTAIN[name])), side, rng)
            findings.append(text)
            impression.append(text)
        else:
            negatives.append(name)
    # the classic combined negative sentence
    trio = ["Consolidation", "Pleural Effusion", "Pneumothorax"]
    if all(n in negatives for n in trio) and rng.random() < 0.7:
        findings.append("There is no focal consolidation, pleural effusion or pneumothorax.")
        negatives = [n for n in negatives if n not in trio]
    findings.extend(_fill(str(rng.choice(_NEGATIVE[n])), "right", rng) for n in negatives)
    findings += [str(x) for x in rng.choice(_FILLER, size=int(rng.integers(0, 3)), replace=False)]
    order = rng.permutation(len(findings))
    findings = [findings[k] for k in order]
    if labels[LABEL_NAMES.index("No Finding")] == 1.0:
        impression.insert(0, str(rng.choice(("No acute cardiopulmonary process.", "No acute intrathoracic process.",
                                             "Normal chest radiograph."))))  # fmt: skip
    if not impression:
        impression.append("No acute change.")
    return findings, impression


def _wrap(text: str, width: int) -> list[str]:
    return [" " + line for line in textwrap.wrap(text, width=width, break_on_hyphens=False)] or [" "]


def _section(header: str, body: str, width: int, rng: np.random.Generator, *, colon: bool = True) -> list[str]:
    """A section as MIMIC lays it out: either `HEADER:  text...` or the header, a blank line, then text."""
    head = header + (":" if colon else "")
    if colon and rng.random() < 0.5 and len(body) < 400:
        return _wrap(f"{head}  {body}", width) + [" "]
    return [f" {head} ", " "] + _wrap(body, width) + [" "]


def write_report(
    labels: np.ndarray,
    sides: dict[str, str],
    *,
    examination: str,
    views: list[str],
    style: str,
    rng: np.random.Generator,
) -> str:
    """The report text of one study (ends with a newline)."""
    if style not in STYLES:
        raise ValueError(f"unknown report style {style!r}; expected one of {tuple(STYLES)}")
    findings, impression = mentions(labels, sides, rng)
    width = int(rng.integers(68, 79))
    exam = examination or "CHEST (PORTABLE AP)"
    technique = {
        True: "Chest PA and lateral",
        False: "Single frontal view of the chest",
    }[any(v in ("LATERAL", "LL") for v in views)]
    comparison = str(rng.choice(("None.", "___", "Chest radiograph from ___.", "Prior exam from ___.")))
    findings_text = "  ".join(findings) if findings else "Lungs are clear."
    impression_text = " ".join(impression)
    lines = ["                                 FINAL REPORT"]
    if style == "wet_read":
        lines = [" WET READ: ___ ___ ___ 10:12 AM", "  " + impression_text[:120], " ______________________________________", *lines]
    if style == "old":
        lines.append(f" {exam.replace('CHEST (', '').rstrip(')')} CHEST, ___")
        lines.append(" ")
        lines += _section("HISTORY", str(rng.choice(_INDICATIONS)).removeprefix("History: "), width, rng)
        lines += _section("COMPARISON", comparison, width, rng)
    else:
        lines.append(f" EXAMINATION:  {exam}")
        lines.append(" ")
        lines += _section("INDICATION", str(rng.choice(_INDICATIONS)), width, rng)
        lines += _section("TECHNIQUE", technique, width, rng)
        lines += _section("COMPARISON", comparison, width, rng)
    find_h, imp_h = ("Findings", "Impression") if style == "mixed_case" else ("FINDINGS", "IMPRESSION")
    if style == "findings_and_impression":
        combined = "  ".join(dict.fromkeys(findings + impression))
        lines += _section("FINDINGS AND IMPRESSION", combined, width, rng)
    else:
        if style != "impression_only":
            lines += _section(find_h, findings_text, width, rng)
        if style == "impression_only":
            # the impression alone has to carry everything the labels say
            lines += _section(imp_h, " ".join(dict.fromkeys(impression + findings)), width, rng)
        elif style == "impression_no_colon":
            lines += [f" {imp_h}", " "] + _wrap(impression_text, width) + [" "]
        elif style == "conclusion":
            lines += _section("CONCLUSION", impression_text, width, rng)
        elif style != "findings_only":
            lines += _section(imp_h, impression_text, width, rng)
    extra = rng.random()
    if extra < 0.06:
        lines += _section("NOTIFICATION", "The findings were discussed with Dr. ___ by Dr. ___ on the telephone on ___ at "
                          "___ ___, ___ minutes after discovery of the findings.", width, rng)  # fmt: skip
    elif extra < 0.09:
        lines += _section("RECOMMENDATION(S)", "Follow-up chest radiograph in ___ weeks after treatment.", width, rng)
    while lines and lines[-1] == " ":
        lines.pop()
    return "\n".join(lines) + "\n"
