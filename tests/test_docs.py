"""The user documentation against the code: README.md and docs/*.md.

- ``docs/configuration.md`` is generated from the settings table and must be
  exactly what :func:`gateway.config.reference.render` gives;
- README.md stays short, and its Quick start has exactly the two ``./dev``
  commands that exist (``serve`` and ``test``);
- every relative Markdown link in README.md and docs/*.md points at a file
  that exists and, when it has one, at an anchor of a heading in that file;
- every setting's flag appears in the configuration reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from gateway.config.reference import reference_path, render
from gateway.config.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "configuration.md"
MAX_README_LINES = 200
QUICK_START_COMMANDS = ["./dev serve", "./dev test"]

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _pages() -> List[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def _prose(text: str) -> str:
    """The text without fenced code blocks (where ``#`` lines and links are not Markdown)."""
    return _FENCE.sub("", text)


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> Set[str]:
    """Every anchor of the headings of a Markdown file, with GitHub's ``-1``, ``-2`` for repeats."""
    seen: Dict[str, int] = {}
    anchors: Set[str] = set()
    for match in _HEADING.finditer(_prose(path.read_text(encoding="utf-8"))):
        base = _github_anchor(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else "%s-%d" % (base, count))
    return anchors


def _links(path: Path) -> List[str]:
    text = _INLINE_CODE.sub("", _prose(path.read_text(encoding="utf-8")))
    return _LINK.findall(text)


def _relative_links() -> List[Tuple[Path, str]]:
    found = []
    for page in _pages():
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # https:, mailto: and the like
            found.append((page, target))
    return found


def _section(text: str, title: str) -> str:
    """The lines under ``## title`` up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    start = lines.index("## " + title) + 1
    end = start
    in_code = False
    while end < len(lines):
        line = lines[end]
        if line.startswith(("```", "~~~")):
            in_code = not in_code
        elif not in_code and re.match(r"^#{1,2} ", line):
            break
        end += 1
    return "\n".join(lines[start:end])


# -- (a) the generated configuration reference -------------------------------------------


def test_configuration_reference_is_generated_from_the_settings() -> None:
    assert Path(reference_path()) == REFERENCE
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
    assert committed == render(), (
        "docs/configuration.md differs from the settings in gateway/config/settings.py: "
        "run `python -m gateway.config.reference --write`")


def test_rendering_is_deterministic() -> None:
    text = render()
    assert text == render()
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "the reference must not hold dates"
    assert str(ROOT) not in text


# -- (b) the README ------------------------------------------------------------------------


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, (
        "README.md has %d lines; keep it under %d and move details to docs/"
        % (len(lines), MAX_README_LINES))


def test_quick_start_has_exactly_the_two_dev_commands() -> None:
    section = _section(README.read_text(encoding="utf-8"), "Quick start")
    commands = []
    for line in section.splitlines():
        words = line.split()
        if words and words[0] == "./dev":
            commands.append(" ".join(words[:2]))
    assert commands == QUICK_START_COMMANDS


# -- (c) links -------------------------------------------------------------------------------


def test_relative_links_point_at_existing_files_and_anchors() -> None:
    links = _relative_links()
    assert links, "no relative links found: the link pattern is broken"
    broken = []
    anchors_of: Dict[Path, Set[str]] = {}
    for page, target in links:
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        where = "%s: (%s)" % (page.relative_to(ROOT), target)
        if not destination.exists():
            broken.append("%s: no such file" % where)
            continue
        if anchor and destination.suffix == ".md":
            if destination not in anchors_of:
                anchors_of[destination] = _anchors(destination)
            if anchor not in anchors_of[destination]:
                broken.append("%s: no heading with that anchor" % where)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_do_not_link_to_old_readme_sections() -> None:
    for page in _pages():
        for target in _links(page):
            assert "README.md#" not in target, "%s links to a README section: %s" % (page.name, target)
            assert "deployment.md" not in target, "%s links to docs/deployment.md: %s" % (page.name, target)


@pytest.mark.parametrize("heading, anchor", [
    ("Spool (`--ack spool`)", "spool---ack-spool"),
    ("Record format (envelope v1)", "record-format-envelope-v1"),
    ("`--ring-size`", "--ring-size"),
    ("Health checks: `/healthz` and `/readyz`", "health-checks-healthz-and-readyz"),
])
def test_github_anchors(heading: str, anchor: str) -> None:
    assert _github_anchor(heading) == anchor


# -- (d) every setting is in the reference ---------------------------------------------------


def test_every_setting_flag_is_in_the_reference() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    missing = [s.flag for s in SETTINGS if "`%s`" % s.flag not in text]
    assert not missing, "flags missing from docs/configuration.md: %s" % missing
    for setting in SETTINGS:
        assert "`%s`" % setting.env in text, setting.env
