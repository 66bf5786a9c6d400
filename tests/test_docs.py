"""The documentation is self-contained: every citation points at a section that exists.

Code, configs and docs cite ``docs/papers.md`` by section (``A.4``, ``B.2-B.3``) and by its
markers (``FLAG-BUG``), ``docs/design.md`` by numbered choice (``choice 4``) and by named
section, and ``docs/launching.md`` by item (``T6``, ``A2``). These tests fail when a file
tracked by git points at notes outside the repository, still names the old notes, or cites a
section, choice or item the docs do not have.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
THIS = Path(__file__).resolve()
# Spelled in parts, so that this file does not contain what it looks for.
OUTSIDE = "shared" + "/" + "spec"
# The old notes' names where they are not part of a path (docs/design.md is fine).
OLD_NOTES = re.compile(r"(?<![\w/.-])(?:paper-spec(?:\.md)?(?![\w-])|(?:multinode|slurm)-local\.md"
                       r"|style\.md|design\.md)")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".cfg", ".ini", ".txt", ".toml", ".rst"}

PAPER_ID = r"[AB]\.\d+(?:\.\d+)*"
ITEM_ID = r"[TADRS]\d+"
JOIN = r"(?:\s*[-–/,]\s*|\s+and\s+)"
PAPER_CITATION = re.compile(rf"papers\.md`?,?\s+({PAPER_ID}(?:{JOIN}{PAPER_ID})*)")
LAUNCHING_CITATION = re.compile(rf"launching\.md`?,?\s+({ITEM_ID}(?:{JOIN}{ITEM_ID})*)\b")
CHOICE_CITATION = re.compile(r"(?:design\.md`?,?\s+|\bdesign\s+)choices?\s+(\d+)(?:\s*(?:-|–|to|and|,)\s*(\d+))?",
                             re.IGNORECASE)
NAMED_SECTION = re.compile(r"(design|launching|papers)\.md`?,?\s+\"([^\"]+)\"")
FLAG = re.compile(r"\bFLAG(?:-[A-Z]+)?\b")


@pytest.fixture(scope="module")
def tracked() -> list[Path]:
    """The files git tracks in this checkout (skips where git cannot list them)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed, so the tracked files cannot be listed")
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"git cannot list the tracked files of {REPO}: {detail.decode(errors='replace').strip() or exc}")
    files = [REPO / p for p in out.decode().split("\0") if p]
    return [f for f in files if f.is_file()]  # a tracked file may be deleted in the work tree


@pytest.fixture(scope="module")
def texts(tracked: list[Path]) -> dict[str, list[str]]:
    """Tracked text files (this one excepted) -> their lines."""
    result = {}
    for path in tracked:
        if path.suffix not in TEXT_SUFFIXES or path.resolve() == THIS:
            continue
        try:
            result[path.relative_to(REPO).as_posix()] = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
    return result


def _headings(doc: str) -> list[str]:
    path = DOCS / doc
    assert path.is_file(), f"docs/{doc} is missing, but the repository cites it"
    return [line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines()
            if re.match(r"#{1,6}\s", line)]


def _ids(headings: list[str], pattern: str) -> set[str]:
    return {m.group(1) for h in headings if (m := re.match(rf"({pattern})\b", h))}


def _citations(texts: dict[str, list[str]], pattern: re.Pattern):
    for name, lines in texts.items():
        for number, line in enumerate(lines, 1):
            for match in pattern.finditer(line):
                yield f"{name}:{number}", match


def test_no_tracked_file_points_outside_the_repository(tracked):
    offenders = []
    for path in tracked:
        data = path.read_bytes()
        if OUTSIDE.encode() in data:
            lines = [n for n, line in enumerate(data.split(b"\n"), 1) if OUTSIDE.encode() in line]
            offenders.append(f"{path.relative_to(REPO).as_posix()}:{','.join(map(str, lines))}")
    assert not offenders, (f"these tracked files cite notes outside the repository ({OUTSIDE}); "
                           f"cite docs/papers.md, docs/design.md or docs/launching.md instead: {offenders}")


def test_no_file_cites_the_old_note_names(texts):
    offenders = [f"{where}: {m.group(0)}" for where, m in _citations(texts, OLD_NOTES)]
    assert not offenders, ("cite docs/papers.md, docs/design.md or docs/launching.md by their path "
                           f"from the repository root: {offenders}")


def test_paper_citations_name_existing_sections(texts):
    headings = _headings("papers.md")
    sections = _ids(headings, PAPER_ID)
    assert {"A.1", "A.4", "A.7", "B.2", "B.4"} <= sections, "docs/papers.md lost its section headings"
    missing = [f"{where}: {ident}" for where, m in _citations(texts, PAPER_CITATION)
               for ident in re.findall(PAPER_ID, m.group(1)) if ident not in sections]
    assert not missing, f"citations of docs/papers.md sections that have no heading there: {missing}"


def test_paper_markers_are_defined(texts):
    markers = {h for h in _headings("papers.md") if FLAG.fullmatch(h)}
    assert {"FLAG", "FLAG-BUG", "FLAG-DISAGREE"} <= markers
    unknown = [f"{where}: {m.group(0)}" for where, m in _citations(texts, FLAG) if m.group(0) not in markers]
    assert not unknown, f"markers with no heading in docs/papers.md: {unknown}"


def test_design_citations_name_existing_choices(texts):
    choices = {int(m.group(1)) for h in _headings("design.md") if (m := re.match(r"Choice (\d+)\b", h))}
    assert choices == set(range(1, len(choices) + 1)) and choices, f"design choices not numbered 1..N: {choices}"
    missing = []
    for where, m in _citations(texts, CHOICE_CITATION):
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        missing += [f"{where}: choice {n}" for n in range(first, last + 1) if n not in choices]
    assert not missing, f"citations of design choices that docs/design.md does not have: {missing}"


def test_launching_citations_name_existing_items(texts):
    items = _ids(_headings("launching.md"), ITEM_ID)
    assert {"T6", "A1", "A2", "A4", "D1", "S6"} <= items, "docs/launching.md lost its item headings"
    missing = [f"{where}: {ident}" for where, m in _citations(texts, LAUNCHING_CITATION)
               for ident in re.findall(ITEM_ID, m.group(1)) if ident not in items]
    assert not missing, f"citations of docs/launching.md items that have no heading there: {missing}"


def test_named_sections_exist(texts):
    headings = {doc: {h.lower() for h in _headings(f"{doc}.md")} for doc in ("design", "launching", "papers")}
    assert "environment facts" in headings["design"] and "code style" in headings["design"]
    missing = [f"{where}: {m.group(1)}.md \"{m.group(2)}\"" for where, m in _citations(texts, NAMED_SECTION)
               if m.group(2).lower() not in headings[m.group(1)]]
    assert not missing, f"citations of named sections that do not exist: {missing}"
