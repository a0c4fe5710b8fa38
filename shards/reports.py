"""MIMIC-CXR free-text reports: find them (zip or unpacked tree) and split them into sections.

A report looks like::

                                     FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)
     INDICATION:  ___F with cough
     FINDINGS:
      The lungs are clear ...
     IMPRESSION:  No acute cardiopulmonary process.

Headers are upper-case words at the start of a line followed by a colon; FINDINGS /
IMPRESSION / CONCLUSION (and combinations such as `FINDINGS AND IMPRESSION`) are also
recognised on a line of their own without a colon. The text used for training is findings +
impression (either alone when only one exists); a report with neither falls back to its last
section, the rule of MIMIC-CXR's own section parser. The whole report (whitespace collapsed) is
kept too: MRM trains on it.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

# "INDICATION:", "FINDINGS AND IMPRESSION:", "PA AND LATERAL VIEWS OF THE CHEST:" at line start.
_COLON_HEADER = re.compile(r"^[ \t]*(?P<name>[A-Z][A-Z0-9 /&(),'\-]{0,60}?)[ \t]*:", re.MULTILINE)
_KEY_WORDS = r"(?:FINDINGS?|IMPRESSIONS?|CONCLUSIONS?)"
# The same key headers on a line of their own, without a colon.
_BARE_HEADER = re.compile(
    rf"^[ \t]*(?P<name>{_KEY_WORDS}(?:[ \t]*(?:AND|/|&)[ \t]*{_KEY_WORDS})?)[ \t]*$", re.MULTILINE
)
PREAMBLE = "preamble"


def normalize_spaces(text: str) -> str:
    """Collapse all runs of whitespace (newlines included) into one space."""
    return " ".join(text.split())


def section_name(header: str) -> str:
    """Canonical lower-case section name: `FINDINGS AND IMPRESSION` -> `findings and impression`,
    `IMPRESSIONS` -> `impression`, `CONCLUSION` -> `impression`."""
    name = normalize_spaces(header).lower()
    name = re.sub(r"\s*(/|&)\s*", " and ", name)
    name = re.sub(r"\bfinding\b", "findings", name)
    name = re.sub(r"\bimpressions\b|\bconclusions?\b", "impression", name)
    return name


def split_sections(report: str) -> dict[str, str]:
    """Sections of a report in order of appearance, {name: normalised text}; text before the
    first header is `preamble`. Repeated sections are joined with a space. Empty ones dropped."""
    report = report.replace("\r\n", "\n").replace("\r", "\n")
    headers = sorted(
        [(m.start(), m.end(), m.group("name")) for m in _COLON_HEADER.finditer(report)]
        + [(m.start(), m.end(), m.group("name")) for m in _BARE_HEADER.finditer(report)]
    )
    # Drop headers that start inside an earlier one (a bare header is also matched with a colon).
    kept: list[tuple[int, int, str]] = []
    for h in headers:
        if not kept or h[0] >= kept[-1][1]:
            kept.append(h)
    sections: dict[str, str] = {}

    def add(name: str, body: str) -> None:
        body = normalize_spaces(body)
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body

    add(PREAMBLE, report[: kept[0][0]] if kept else report)
    for i, (_, end, name) in enumerate(kept):
        stop = kept[i + 1][0] if i + 1 < len(kept) else len(report)
        add(section_name(name), report[end:stop])
    return sections


def training_text(sections: dict[str, str]) -> str | None:
    """findings + impression (one alone when only one exists); a combined `findings and
    impression` section counts as both; with neither, the last section (None if empty)."""
    findings = sections.get("findings")
    impression = sections.get("impression")
    combined = sections.get("findings and impression") or sections.get("impression and findings")
    parts = [p for p in (findings, combined, impression) if p]
    if parts:
        return " ".join(parts)
    rest = [v for k, v in sections.items() if k != PREAMBLE]
    return rest[-1] if rest else None


_NUMBERED = re.compile(r"[0-9]+\.")
_WORD = re.compile(r"\w+")
MGCA_MIN_WORDS = 3


def mgca_caption(sections: dict[str, str]) -> str | None:
    r"""MGCA's pre-training caption (HKU-MedAI/MGCA `datasets/pretrain_dataset.py`,
    `create_path_2_sent_mapping`): impression then findings (a combined `findings and impression`
    section counts as the impression, as MIMIC-CXR's section parser names it), split into
    sentences at numbered-list marks ("1.") and full stops; each sentence lower-cased and reduced
    to its `\w+` words with non-ASCII characters removed; sentences of one word dropped; the
    sentences joined by spaces. None when neither section exists or fewer than 3 words remain
    (the published code leaves such studies out)."""
    impression = " ".join(
        p for p in (sections.get("findings and impression"), sections.get("impression and findings"),
                    sections.get("impression")) if p
    )
    findings = sections.get("findings", "")
    if not impression and not findings:
        return None
    text = (impression or " ") + " " + (findings or " ")
    sentences, words = [], 0
    for piece in _NUMBERED.split(text.replace("\n", " ")):
        for sentence in piece.split("."):
            tokens = _WORD.findall(sentence.replace("\ufffd\ufffd", " ").lower())
            if len(tokens) <= 1:
                continue
            kept = [a for a in (t.encode("ascii", "ignore").decode("ascii") for t in tokens) if a]
            if kept:
                sentences.append(" ".join(kept))
            words += len(kept)
    return " ".join(sentences) if words >= MGCA_MIN_WORDS else None


def has_key_sections(sections: dict[str, str]) -> bool:
    return any(k in sections for k in ("findings", "impression", "findings and impression", "impression and findings"))


_REPORT_NAME = re.compile(r"(?:^|/)p(?P<subject>\d+)/s(?P<study>\d+)\.txt$")


def report_relpath(subject_id: str | int, study_id: str | int) -> str:
    """`files/p10/p10000032/s50414267.txt`"""
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}.txt"


class ReportStore:
    """Reads MIMIC-CXR reports from `mimic-cxr-reports.zip` or from the folder that holds the
    unpacked `files/` tree (often the JPG root). Opened lazily; safe to pickle to workers."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"--reports {path} does not exist (expected mimic-cxr-reports.zip or the folder holding files/)")
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise ValueError(f"--reports {path} is a file but not a zip archive")
            self.kind = "zip"
        else:
            if path.name == "files" and not (path / "files").is_dir():
                path = path.parent
            if not (path / "files").is_dir():
                raise ValueError(f"--reports {path} holds no files/ folder (expected files/pXX/pXXXXXXXX/sXXXXXXXX.txt)")
            if next((path / "files").glob("p*/p*/s*.txt"), None) is None:
                hint = " (mimic-cxr-reports.zip is there: pass the zip, or unpack it)" if (path / "mimic-cxr-reports.zip").is_file() else ""
                raise ValueError(f"--reports {path}/files holds no report files pXX/pXXXXXXXX/sXXXXXXXX.txt{hint}")
            self.kind = "dir"
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._names: dict[tuple[str, str], str] | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "kind": self.kind, "_zip": None, "_names": None}

    def _index(self) -> dict[tuple[str, str], str]:
        if self._names is None:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"--reports {self.path}: cannot open the zip ({e})") from None
            names: dict[tuple[str, str], str] = {}
            for name in self._zip.namelist():
                m = _REPORT_NAME.search(name)
                if m:
                    names[(m.group("subject"), m.group("study"))] = name
            if not names:
                raise ValueError(f"{self.path} holds no report files (expected files/pXX/pXXXXXXXX/sXXXXXXXX.txt)")
            self._names = names
        return self._names

    def read(self, subject_id: str | int, study_id: str | int) -> str | None:
        """The raw report text, or None when this study has no report."""
        if self.kind == "zip":
            name = self._index().get((str(subject_id), str(study_id)))
            if name is None:
                return None
            assert self._zip is not None
            try:
                data = self._zip.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
                raise ValueError(f"{self.path}: member {name} is corrupt ({type(e).__name__}: {e}); re-download the zip") from None
            return data.decode("utf-8", errors="replace")
        p = self.path / report_relpath(subject_id, study_id)
        try:
            return p.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


@dataclass(frozen=True, slots=True)
class Report:
    sections: dict[str, str]
    #: findings + impression (`training_text`)
    text: str | None
    #: the whole report, whitespace collapsed (MRM trains on it)
    full: str
    #: MGCA's caption (`mgca_caption`); None when MGCA leaves the study out
    mgca: str | None = None

    def texts(self) -> dict[str, str]:
        """The texts the shards tokenize, by their name in `schema.TEXTS` (an optional one only when it exists)."""
        assert self.text is not None
        out = {"findings_impression": self.text, "report": self.full}
        if self.mgca is not None:
            out["mgca_caption"] = self.mgca
        return out


def parse_report(raw: str | None) -> Report | None:
    """Split and pick the training text; None when there is no report or no text at all."""
    if raw is None:
        return None
    sections = split_sections(raw)
    text = training_text(sections)
    return Report(sections, text, normalize_spaces(raw), mgca_caption(sections)) if text else None
