"""The docs stay true: generated tables current, local links and images resolve, every page indexed.

Links and headings are read with markdown-it-py (CommonMark), so links inside code are not links;
anchors follow GitHub's rule (lowercase, punctuation removed, spaces to '-', `-1`, `-2` for repeats).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
_MD = MarkdownIt("commonmark").enable("table")


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown_pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", root / "BENCHMARKS.md", *sorted((root / "docs").glob("*.md"))]


def _inline_text(token) -> str:
    return "".join(child.content for child in token.children or () if child.type in ("text", "code_inline"))


def github_anchors(text: str) -> set[str]:
    """The `#anchors` GitHub gives the headings of a Markdown text."""
    tokens, seen, anchors = _MD.parse(text), {}, set()
    for index, token in enumerate(tokens):
        if token.type != "heading_open":
            continue
        slug = re.sub(r"[^\w\- ]", "", _inline_text(tokens[index + 1]).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def local_links(text: str) -> list[str]:
    """Every link and image target of a Markdown text that is not a URL with a scheme."""
    targets = []
    for token in _MD.parse(text):
        for child in token.children or ():
            target = child.attrGet("href") if child.type == "link_open" else child.attrGet("src")
            if (
                child.type in ("link_open", "image")
                and target
                and not re.match(r"[a-z][a-z0-9+.-]*:", target)
            ):
                targets.append(str(target))
    return targets


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """'page: target (why)' for each local link or image of `page` that does not resolve."""
    problems = []
    for target in local_links(page.read_text()):
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(root)}: {target}"
        if not path.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in github_anchors(path.read_text()):
            problems.append(f"{where} (no heading with that anchor in {path.name})")
    return problems


def unindexed_pages(root: Path = ROOT) -> list[str]:
    """The docs/*.md pages the README does not link to."""
    readme = root / "README.md"
    linked = {(root / target.partition("#")[0]).resolve() for target in local_links(readme.read_text())}
    return [page.name for page in sorted((root / "docs").glob("*.md")) if page.resolve() not in linked]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_local_links_and_images_resolve(page: Path) -> None:
    assert link_problems(page) == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    assert unindexed_pages() == []


def test_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_generated_tables_are_current() -> None:
    """`scripts/gen_docs.py --check`, as a developer runs it (CI fails on a stale table)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_gfocal_ini_examples_name_real_settings() -> None:
    """A `[gfocal]` example in the docs only uses keys the settings docstring documents."""
    known = _gen_docs().settings_keys()
    used = []
    for page in markdown_pages():
        for token in _MD.parse(page.read_text()):
            if token.type == "fence" and token.info.strip() == "ini" and "[gfocal]" in token.content:
                used += [
                    (page.name, line.split("=")[0].strip())
                    for line in token.content.splitlines()
                    if "=" in line
                ]
    assert used, "no [gfocal] ini example found"
    assert [(name, key) for name, key in used if key not in known] == []


# --- the checks catch what they are for -----------------------------------------------------------


def test_a_broken_link_image_or_anchor_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Caches: what a nightly reuses\n\ntext\n")
    (tmp_path / "README.md").write_text(
        "# R\n\n[ok](docs/a.md#caches-what-a-nightly-reuses) [gone](docs/b.md) "
        "[bad anchor](docs/a.md#caches) ![img](docs/none.png) [web](https://example.com) "
        "`[in code](docs/c.md)`\n"
    )
    problems = link_problems(tmp_path / "README.md", tmp_path)
    assert problems == [
        "README.md: docs/b.md (no such file)",
        "README.md: docs/a.md#caches (no heading with that anchor in a.md)",
        "README.md: docs/none.png (no such file)",
    ]
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n")
    assert unindexed_pages(tmp_path) == ["orphan.md"]


def test_github_anchor_rules() -> None:
    text = "# `gfocal doctor`: is it ready?\n## Nightly at scale (bench_nightly.py)\n## Retries\n## Retries\n"
    assert github_anchors(text) == {
        "gfocal-doctor-is-it-ready",
        "nightly-at-scale-bench_nightlypy",
        "retries",
        "retries-1",
    }


def test_a_stale_table_is_reported_and_rewritten(tmp_path: Path) -> None:
    gen_docs = _gen_docs()
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# R\n")
    page = tmp_path / "docs" / "t.md"
    page.write_text("# T\n\n<!-- generated: timeouts -->\n| hand | written |\n<!-- end generated -->\n")
    tables = {"timeouts": "| kind | budget |\n", "settings": "| key |\n"}
    assert gen_docs.update(tmp_path, tables, write=False) == (["docs/t.md"], ["settings"])
    gen_docs.update(tmp_path, tables, write=True)
    assert "| kind | budget |\n<!-- end generated -->" in page.read_text()
    assert gen_docs.update(tmp_path, tables, write=False) == ([], ["settings"])
