"""Report section splitting on the awkward cases of MIMIC-CXR's free text."""

from __future__ import annotations

import zipfile

import pytest

from cxrfast.shards.reports import ReportStore, mgca_caption, parse_report, split_sections, training_text

TYPICAL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_typical_report_sections_and_text() -> None:
    s = split_sections(TYPICAL)
    assert list(s) == ["preamble", "examination", "indication", "comparison", "findings", "impression"]
    assert s["preamble"] == "FINAL REPORT"
    assert s["indication"] == "___F with new onset ascites // eval for infection"
    # Wrapped lines are joined with single spaces; ___ is kept verbatim.
    assert s["findings"].startswith("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular")
    assert training_text(s) == s["findings"] + " " + "No acute cardiopulmonary process."


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        # impression alone
        ("FINAL REPORT\n INDICATION: cough\n IMPRESSION:  Mild   edema.\n", "Mild edema."),
        # findings alone, text on the header line, wrapped
        ("FINAL REPORT\n FINDINGS: Heart size is\n normal.\n", "Heart size is normal."),
        # combined header variant
        ("EXAMINATION: CHEST\n FINDINGS AND IMPRESSION: No change.\n", "No change."),
        ("FINDINGS/IMPRESSION:\n Stable lines.\n", "Stable lines."),
        # IMPRESSION on its own line without a colon
        ("FINAL REPORT\nFINDINGS:\nClear lungs.\nIMPRESSION\nNormal chest.\n", "Clear lungs. Normal chest."),
        # CONCLUSION counts as the impression
        ("TECHNIQUE: AP\nCONCLUSION: Small effusion.\n", "Small effusion."),
        # neither: the last section, like MIMIC-CXR's own section parser
        ("EXAMINATION: CHEST\nINDICATION: fever\nNOTIFICATION: Dr. ___ was told at 10:30.\n", "Dr. ___ was told at 10:30."),
        # extra section after the impression is not training text
        ("FINDINGS: A.\nIMPRESSION: B.\nRECOMMENDATION(S): CT in 3 months.\n", "A. B."),
    ],
)
def test_awkward_reports(report: str, expected: str) -> None:
    assert training_text(split_sections(report)) == expected


def test_colon_inside_text_and_crlf_are_not_headers() -> None:
    s = split_sections("FINDINGS: Tube tip at 3:45 position; ratio 1:2.\r\nIMPRESSION: ok.\r\n")
    assert s == {"findings": "Tube tip at 3:45 position; ratio 1:2.", "impression": "ok."}


def test_repeated_sections_are_joined_and_empty_reports_are_none() -> None:
    s = split_sections("FINDINGS: one.\nIMPRESSION: x.\nFINDINGS: two.\n")
    assert s["findings"] == "one. two."
    assert parse_report(None) is None
    assert parse_report("   \n") is None
    assert parse_report("FINDINGS:\n\nIMPRESSION:\n") is None


def test_report_store_zip_and_folder(tmp_path) -> None:
    text = "FINDINGS: clear.\n"
    (tmp_path / "tree/files/p10/p10000032").mkdir(parents=True)
    (tmp_path / "tree/files/p10/p10000032/s50414267.txt").write_text(text)
    with zipfile.ZipFile(tmp_path / "mimic-cxr-reports.zip", "w") as zf:
        zf.writestr("mimic-cxr-reports/files/p10/p10000032/s50414267.txt", text)  # with a top folder
    for path in (tmp_path / "tree", tmp_path / "tree/files", tmp_path / "mimic-cxr-reports.zip"):
        store = ReportStore(path)
        assert store.read("10000032", "50414267") == text
        assert store.read(10000032, 59999999) is None
    with pytest.raises(ValueError, match="no files/ folder"):
        ReportStore(tmp_path)
    (tmp_path / "jpgs/files/p10/p10000032/s50414267").mkdir(parents=True)
    (tmp_path / "jpgs/mimic-cxr-reports.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no report files.*pass the zip"):
        ReportStore(tmp_path / "jpgs")
    with pytest.raises(ValueError, match="does not exist"):
        ReportStore(tmp_path / "nope.zip")


def test_a_corrupt_zip_member_is_named(tmp_path) -> None:
    path = tmp_path / "mimic-cxr-reports.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("files/p10/p10000032/s50414267.txt", "FINDINGS: clear.\n")
    data = bytearray(path.read_bytes())
    data[30 + len("files/p10/p10000032/s50414267.txt") + 3] ^= 0xFF  # a byte of the stored text: CRC mismatch
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"member files/p10/p10000032/s50414267.txt is corrupt \(BadZipFile"):
        ReportStore(path).read("10000032", "50414267")


def test_mgca_caption_follows_the_published_rule() -> None:
    r"""Impression first, sentences at '.' and '1.' marks, lower-case \w+ words, ASCII only,
    one-word sentences dropped (MGCA pretrain_dataset.py)."""
    s = split_sections(TYPICAL)
    assert mgca_caption(s) == (
        "no acute cardiopulmonary process there is no focal consolidation pleural effusion or pneumothorax "
        "bilateral nodular opacities that most likely represent nipple shadows"
    )
    numbered = {"impression": "1. Mild edema.  2. No effusion.\nStable.", "findings": "Heart size is normal (12.3 cm)."}
    # "Stable" is a one-word sentence: dropped; "12." is a numbered-list mark to the published splitter
    assert mgca_caption(numbered) == "mild edema no effusion heart size is normal 3 cm"
    assert mgca_caption({"findings and impression": "Lungs are clear."}) == "lungs are clear"
    assert mgca_caption({"findings": "Caf\u00e9-au-lait  \u00b5m lesion."}) == "caf au lait m lesion"


@pytest.mark.parametrize("sections", [
    {"impression": "No pneumothorax."},  # 2 words: fewer than 3
    {"impression": "Normal. Stable. Unchanged."},  # one-word sentences only
    {"indication": "Cough, fever and chills."},  # neither impression nor findings
    {},
])
def test_mgca_caption_drops_studies_the_published_code_leaves_out(sections: dict) -> None:
    assert mgca_caption(sections) is None
