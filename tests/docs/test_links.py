"""Every relative link and #anchor in the project's Markdown resolves, the way GitHub resolves them.

The Markdown is parsed with markdown-it-py (CommonMark plus GitHub's tables), so links inside code
spans and fenced blocks are not links, and reference-style links count like inline ones. A
relative link must name a file or folder of the checkout; `#anchor` (alone or after a `.md` path)
must be the slug of a heading there, made as GitHub makes it (github-slugger): the heading's text
in lowercase, every character that is not a letter, digit, `_`, `-` or space dropped, spaces
turned into `-`, and `-1`, `-2`, ... added to repeats. External http(s) links are not fetched (no
network), only checked for a scheme and a host.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

REPO_ROOT = Path(__file__).resolve().parents[2]
PARSER = MarkdownIt("commonmark").enable("table")


def markdown_files(root: Path) -> list[Path]:
    """README.md and every Markdown file under docs/, plus the other Markdown the checkout keeps."""
    files = {root / "README.md", *root.glob("docs/**/*.md"), *root.glob("deploy/**/*.md")}
    return sorted(f for f in files if f.is_file())


def slug(text: str) -> str:
    """GitHub's anchor for a heading whose rendered text is `text` (before de-duplication)."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _inline_text(token: Token) -> str:
    """The text a heading's inline token renders to: code spans keep their content, markup goes."""
    return "".join(child.content for child in token.children or [] if child.type in ("text", "code_inline"))


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    tokens = PARSER.parse(path.read_text(encoding="utf-8"))
    for opening, inline in pairwise(tokens):
        if opening.type != "heading_open":
            continue
        base = slug(_inline_text(inline))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


@dataclass(frozen=True)
class Link:
    target: str
    line: int  # 1-based line of the block holding the link


def links(path: Path) -> Iterator[Link]:
    for block in PARSER.parse(path.read_text(encoding="utf-8")):
        if block.type != "inline":
            continue
        line = (block.map[0] + 1) if block.map else 0
        for child in block.children or []:
            if child.type == "link_open":
                yield Link(str(child.attrs.get("href", "")), line)
            elif child.type == "image":
                yield Link(str(child.attrs.get("src", "")), line)


def problems(path: Path, root: Path) -> list[str]:
    """What is wrong with the links of one Markdown file, one message per broken link."""
    found: list[str] = []
    own_anchors: set[str] | None = None
    for link in links(path):
        where = f"{path.relative_to(root)}:{link.line}: {link.target!r}"
        parts = urlsplit(link.target)
        if parts.scheme in ("http", "https"):
            if not parts.netloc or " " in link.target:
                found.append(f"{where}: not a well-formed URL")
            continue
        if parts.scheme or parts.netloc:
            found.append(f"{where}: only relative links and http(s) URLs are allowed")
            continue
        if not parts.path:
            if own_anchors is None:
                own_anchors = anchors(path)
            if unquote(parts.fragment) not in own_anchors:
                found.append(f"{where}: no heading with this anchor here")
            continue
        if parts.path.startswith("/"):
            found.append(f"{where}: absolute path; link relative to this file")
            continue
        target = (path.parent / unquote(parts.path)).resolve()
        if not target.is_relative_to(root):
            found.append(f"{where}: points outside the checkout")
        elif not target.exists():
            found.append(f"{where}: {target.relative_to(root)} does not exist")
        elif parts.fragment and target.suffix == ".md" and unquote(parts.fragment) not in anchors(target):
            found.append(f"{where}: no heading with this anchor in {target.relative_to(root)}")
        elif parts.fragment and target.suffix != ".md":
            found.append(f"{where}: an anchor into a file that is not Markdown")
    return found


def test_the_documentation_is_found() -> None:
    names = {str(f.relative_to(REPO_ROOT)) for f in markdown_files(REPO_ROOT)}
    assert {"README.md", "docs/deployment.md", "docs/benchmarks.md"} <= names


@pytest.mark.parametrize("path", markdown_files(REPO_ROOT), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_links_resolve(path: Path) -> None:
    assert problems(path, REPO_ROOT) == []


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Replicas × workers × ORT threads", "replicas--workers--ort-threads"),
        ("Tiled `/reconstruct` for large images", "tiled-reconstruct-for-large-images"),
        ("Model card: `in_autoencoder`, blind colour denoiser", "model-card-in_autoencoder-blind-colour-denoiser"),
        ("int8, tried and not served", "int8-tried-and-not-served"),
        ("Open Inference Protocol v2 (KServe / Triton)", "open-inference-protocol-v2-kserve--triton"),
        ("**Bold** and [a link](x.md)", "bold-and-a-link"),
    ],
)
def test_anchor_slugs_follow_github(tmp_path: Path, heading: str, anchor: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"# {heading}\n\ntext\n", encoding="utf-8")
    assert anchors(page) == {anchor}


def test_repeated_headings_get_numbered_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Notes\n\n## Notes\n", encoding="utf-8")
    assert anchors(page) == {"notes", "notes-1", "notes-2"}


def test_broken_links_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md#other-page) [ok](#page) ![ok](../image.png) [ok](https://example.org/x) [ok](../docs/)\n\n"
        "[missing](nothing.md) [bad anchor](other.md#nope) [bad own](#nope) ![gone](gone.png)\n\n"
        "[outside](../../elsewhere.md) [absolute](/etc/passwd) [scheme](ftp://example.org) [no host](https://)\n\n"
        "`[in code](nothing.md)`\n\n```\n[in a block](nothing.md)\n```\n",
        encoding="utf-8",
    )
    reported = problems(page, tmp_path)
    assert [message.split(": ")[1] for message in reported] == [
        "'nothing.md'",
        "'other.md#nope'",
        "'#nope'",
        "'gone.png'",
        "'../../elsewhere.md'",
        "'/etc/passwd'",
        "'ftp://example.org'",
        "'https://'",
    ]
