"""The docs the code points to exist: every `README, "Section"` or `docs/x.md, "Section"` reference in the code,
the tools and the docs names a heading of that file."""

import re

from conftest import ROOT

REFERENCE = re.compile(r'(README|docs/[\w.]+\.md)(?:\.md)?,? (?:section )?"([^"]+)"')


def _text(path) -> str:
    """A file's text with comment and docstring line breaks folded, so a reference split over lines reads whole."""
    return re.sub(r"\n\s*(#\s*)?", " ", path.read_text())


def _headings(name: str) -> list[str]:
    path = ROOT / ("README.md" if name == "README" else name)
    return [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]


def references():
    files = [*ROOT.glob("alexnet_pipeline/*.py"), *ROOT.glob("tools/*"), ROOT / "README.md", *ROOT.glob("docs/*.md"),
             ROOT / "Makefile"]
    return [(f.relative_to(ROOT), target, section) for f in files if f.is_file()
            for target, section in REFERENCE.findall(_text(f))]


def test_every_reference_to_a_docs_section_names_a_heading_that_exists():
    found = references()
    assert len(found) >= 5  # the pattern still finds the references the code makes
    missing = [(str(f), target, section) for f, target, section in found
               if not any(section in heading for heading in _headings(target))]
    assert missing == []


def test_the_pattern_finds_a_reference_split_over_comment_lines(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('# see (README, "Where a\n    # step\'s time goes")\n')
    assert REFERENCE.findall(_text(f)) == [("README", "Where a step's time goes")]
