"""The READMEs and docs/ stay true: every config key and command documented, every link resolving,
the generated config reference current, and the MkDocs site building in strict mode."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

from chinese_vicuna.cli import build_parser
from chinese_vicuna.config import field_help

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_PATH = ROOT / "README.md"
README_ZH_PATH = ROOT / "README.zh.md"
README = README_PATH.read_text(encoding="utf-8")
DOC_PAGES = sorted(DOCS.glob("*.md"))
ALL_DOCS = README + "\n".join(p.read_text(encoding="utf-8") for p in DOC_PAGES)
LINKED_FILES = [README_PATH, README_ZH_PATH, *DOC_PAGES]


# -- commands ---------------------------------------------------------------------------------------

def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command as a path of names: ("train",), ("data", "convert", "cmedqa"), ..."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = prefix + (name,)
                paths.append(path)
                paths += _command_paths(sub, path)
    return paths


COMMANDS = _command_paths(build_parser())


def _command_table(text: str) -> list[str]:
    """The first cells of the command table: the rows under the README's commands heading."""
    section = re.split(r"^## ", text, flags=re.M)
    table = next(s for s in section if s.startswith(("Commands", "命令")))
    return [row.split(" | ")[0] for row in table.splitlines() if row.startswith("| `")]


@pytest.mark.parametrize("readme", [README_PATH, README_ZH_PATH], ids=lambda p: p.name)
def test_every_command_documented(readme):
    """Each command, sub-command and sub-sub-command has a line in the README's command table."""
    cells = _command_table(readme.read_text(encoding="utf-8"))
    missing = [" ".join(path) for path in COMMANDS
               if not any(cell.startswith(f"| `{path[0]}")
                          and all(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", cell) for w in path[1:])
                          for cell in cells)]
    assert not missing


def test_every_command_in_the_docs_home():
    home = (DOCS / "index.md").read_text(encoding="utf-8")
    assert not [path[0] for path in COMMANDS if f"`{path[0]}" not in home and f"<code>{path[0]}" not in home]


# -- config keys ------------------------------------------------------------------------------------

def test_every_config_key_documented():
    reference = (DOCS / "config.md").read_text(encoding="utf-8")
    missing = [k for k, _, _ in field_help() if f"`{k}`" not in reference or f"`{k}`" not in ALL_DOCS]
    assert not missing


def test_config_reference_is_current():
    """docs/config.md is exactly what the generator writes (`make docs` or
    `python -m chinese_vicuna.docs_reference docs/config.md` updates it)."""
    from chinese_vicuna.docs_reference import config_reference_markdown

    assert (DOCS / "config.md").read_text(encoding="utf-8") == config_reference_markdown()


# -- links and anchors ------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks, with inline code removed."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"(`+).+?\1", "", line.replace("\\`", "")))
    return out


def _heading_texts(path: Path) -> list[str]:
    texts = []
    for line in _prose_lines(path.read_text(encoding="utf-8").replace("`", "")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading: its text
            texts.append(re.sub(r"[*_]{2}(.+?)[*_]{2}", r"\1", text))
    return texts


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's toc slugify (MkDocs' default)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def github_slug(text: str) -> str:
    """GitHub's heading ids: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _links(path: Path) -> list[str]:
    return [m.group(1) for line in _prose_lines(path.read_text(encoding="utf-8")) for m in LINK.finditer(line)]


def test_readme_and_docs_have_links():
    assert "docs/index.md" in _links(README_PATH) and "docs/index.md" in _links(README_ZH_PATH)
    assert "README.zh.md" in _links(README_PATH) and "README.md" in _links(README_ZH_PATH)


@pytest.mark.parametrize("source", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(source):
    """Every relative link points at an existing file, `#anchor`s at a heading of the target (the same
    id under MkDocs' and GitHub's slug rules), and links between docs pages stay inside docs/."""
    broken = []
    for link in _links(source):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (source.parent / target).resolve() if target else source
        if not path.exists():
            broken.append(f"{link}: no such file")
            continue
        if source.parent == DOCS and DOCS not in path.parents:
            broken.append(f"{link}: outside docs/ (the site cannot link to it)")
        if anchor:
            if path.suffix != ".md":
                broken.append(f"{link}: anchor into a non-Markdown file")
                continue
            headings = _heading_texts(path)
            if anchor not in {mkdocs_slug(h) for h in headings} or anchor not in {github_slug(h) for h in headings}:
                broken.append(f"{link}: no heading with id {anchor!r} in {path.name}")
    assert not broken


def test_slugs():
    assert mkdocs_slug("Hub ids and the seeds' adapters") == github_slug("Hub ids and the seeds' adapters") \
        == "hub-ids-and-the-seeds-adapters"
    assert mkdocs_slug("Long context (rope_scaling)") == "long-context-rope_scaling"
    assert mkdocs_slug("Run with llama.cpp") == github_slug("Run with llama.cpp") == "run-with-llamacpp"


# -- shape of the READMEs and the site --------------------------------------------------------------

def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_readmes_switch_language():
    assert "README.zh.md" in README.splitlines()[0]
    assert "README.md" in README_ZH_PATH.read_text(encoding="utf-8").splitlines()[0]


def test_readme_keeps_the_two_setup_commands():
    for text in (README, README_ZH_PATH.read_text(encoding="utf-8")):
        assert "make demo" in text and "make test" in text


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def test_every_docs_page_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs" and config["strict"] is True
    nav = _nav_pages(config["nav"])
    assert sorted(nav) == sorted(p.name for p in DOC_PAGES)
    assert len(nav) == len(set(nav))


def test_mkdocs_build_strict(tmp_path):
    """The site builds with broken links, missing anchors and pages outside the nav as errors."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").exists()
