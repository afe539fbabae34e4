"""The documentation holds together: README.md stays a short front door whose set-up commands CI relies on,
every relative link in README.md and docs/*.md points to a file that exists, and docs/README.md indexes every page."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
INDEX = DOCS / "README.md"
MAX_README_BYTES = 9000

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_INLINE_CODE = re.compile(r"(`+)(?:.+?)\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where `[x](y)` is not a link."""
    kept, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None:
            # an opening fence of backticks may not have a backtick in its info string (CommonMark)
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                fence = match.group(1)
                continue
            kept.append(line)
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) and not match.group(2).strip():
            fence = None
    return _INLINE_CODE.sub("", "\n".join(kept))


def _links(path: Path) -> list[str]:
    return _LINK.findall(_prose(path.read_text(encoding="utf-8")))


def _relative_targets(path: Path) -> list[tuple[str, Path]]:
    """(link, resolved path) for each relative link of `path`, anchors stripped; web, mail and pure anchor links left out."""
    out = []
    for link in _links(path):
        if not link or link.startswith("#") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link):
            continue
        target = link.split("#", 1)[0].split("?", 1)[0]
        out.append((link, (path.parent / target).resolve()))
    return out


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_link_parser_reads_links_and_skips_code():
    text = ("See [a](docs/a.md#x), ![img](b.png) and [web](https://x.org).\n"
            "`[not](code.md)` and ```` ```[no](inline.md) ```` \n"
            "```python\nx = y[0](z)\n[no](fenced.md)\n```\n[yes](c.md \"title\")\n")
    assert _LINK.findall(_prose(text)) == ["docs/a.md#x", "b.png", "https://x.org", "c.md"]


def test_every_relative_link_points_to_an_existing_file():
    broken = [f"{page.relative_to(ROOT)}: ({link})" for page in _pages()
              for link, target in _relative_targets(page) if not target.exists()]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_readme_is_short_and_opens_with_the_set_up_commands():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; keep it at most {MAX_README_BYTES} (move reference to docs/)"
    match = re.search(r"^```[^\n]*\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert match, "README.md has no code block"
    lines = match.group(1).splitlines()
    assert len(lines) == 2, lines
    assert "pip install torch==2.13.0" in lines[0] and lines[0].rstrip().endswith("arena play lsp"), lines[0]
    assert lines[1].strip() == ". .venv/bin/activate && python -m pytest", lines[1]


def test_docs_index_links_every_page():
    linked = {target for _, target in _relative_targets(INDEX)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p != INDEX and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link to: {', '.join(missing)}"
