"""The documentation cannot rot: every Python example in ``docs/`` runs, and the site builds strictly.

Convention for fenced code blocks in ``docs/**/*.md``:

* ```` ```python ```` blocks **run**. The blocks of one page run in order in one namespace, so a page
  reads like a notebook: an import in the first block serves the later ones.
* ```` ```python {.no-run} ```` blocks are shown, highlighted as Python, but **not run**. Use this for
  signatures, pseudo-code and snippets that need a GPU or a long computation. A title may be added
  inside the braces, ```` ```python {.no-run title="Needs CUDA"} ````. A bare ```` ```python no-run ````
  is rejected: Markdown would show it as plain text, not as a code block.
* Blocks with any other language (``bash``, ``text``, ``pycon``, ...) are not run.

Fences may be indented (inside admonitions or content tabs); the indentation is removed before
running. Examples must be small: this whole file has to finish well within a minute.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_PYTHON_INFO = re.compile(r"^python(?:\s+(?P<attrs>\{[^}]*\}|title=\"[^\"]*\"))?\s*$")


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line number, info string, code)`` of every fenced block, with the fence's indentation removed."""
    blocks = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        start = i + 1
        i += 1
        body = []
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        blocks.append((start, info, "\n".join(body)))
        i += 1
    return blocks


def runnable(info: str) -> bool:
    """Whether a block with this info string runs; raises for malformed ``python`` fences."""
    if info.split(maxsplit=1)[:1] != ["python"]:
        return False
    match = _PYTHON_INFO.match(info)
    if match is None:
        raise ValueError(
            f"unrecognised fence info {info!r}: use ```python, ```python {{.no-run}} or "
            '```python {.no-run title="..."}'
        )
    return ".no-run" not in (match["attrs"] or "")


PAGES = sorted(DOCS.rglob("*.md"))


def page_id(page: Path) -> str:
    return str(page.relative_to(DOCS))


def test_docs_have_pages_with_examples():
    # Guards the collection itself: an empty glob would make the examples test pass vacuously.
    assert len(PAGES) >= 10
    assert sum(any(runnable(info) for _, info, _ in code_blocks(p.read_text())) for p in PAGES) >= 5


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_examples_run(page, monkeypatch, tmp_path):
    blocks = [(line, code) for line, info, code in code_blocks(page.read_text(encoding="utf-8")) if runnable(info)]
    if not blocks:
        pytest.skip("no runnable examples")
    # Offline and headless, and in a scratch directory so an example that writes files leaves no trace.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        # Pad with blank lines so tracebacks show the line number in the Markdown file.
        exec(compile("\n" * line + code, str(page), "exec"), namespace)


def test_readme_examples_run(monkeypatch, tmp_path):
    blocks = [(line, code) for line, info, code in code_blocks((REPO / "README.md").read_text(encoding="utf-8"))
              if runnable(info)]
    assert blocks, "the README's approximate example is gone"
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for line, code in blocks:
        exec(compile("\n" * line + code, str(REPO / "README.md"), "exec"), namespace)


def test_every_image_is_shown_on_a_page():
    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    images = sorted((DOCS / "img").rglob("*.png"))
    assert images
    unused = [str(image.relative_to(DOCS)) for image in images if str(image.relative_to(DOCS)) not in text]
    assert not unused, f"images no page shows: {unused}"


def test_fence_convention_rejects_bare_no_run():
    assert runnable("python") and runnable('python title="x"')
    assert not runnable("python {.no-run}") and not runnable('python {.no-run title="Needs CUDA"}')
    assert not runnable("bash") and not runnable("")
    with pytest.raises(ValueError, match="unrecognised fence info"):
        runnable("python no-run")
    blocks = code_blocks("text\n\n=== \"tab\"\n\n    ```python\n    x = 1\n    ```\n\n```bash\nls\n```\n")
    assert blocks == [(5, "python", "x = 1"), (9, "bash", "ls")]


class _TextOutsideMath(HTMLParser):
    """The text of an HTML page that a reader sees as prose: outside rendered math, code, scripts and styles."""

    SKIPPED_TAGS = {"code", "pre", "script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.skipping, self.depth, self.parts = None, 0, []

    def handle_starttag(self, tag, attrs):
        if self.skipping is not None:
            # Only the skipped element's own tag can close it; counting nested copies finds its end.
            self.depth += tag == self.skipping
            return
        if tag in self.SKIPPED_TAGS or "arithmatex" in (dict(attrs).get("class") or "").split():
            self.skipping, self.depth = tag, 1

    def handle_endtag(self, tag):
        if tag == self.skipping:
            self.depth -= 1
            if self.depth == 0:
                self.skipping = None

    def handle_data(self, data):
        if self.skipping is None:
            self.parts.append(data)


# Math delimiters, or a LaTeX command such as \operatorname: Markdown eats the backslash of a "\[" that
# arithmatex did not take (no blank line before it in a list item), so a formula left unrendered often shows
# only as "[" followed by its commands.
_RAW_MATH = re.compile(r"\\\[|\\\(|\$\$|\\begin\{|\\[A-Za-z]{2,}")


def raw_math(html: str) -> list[str]:
    """Every math delimiter or LaTeX command in ``html`` outside rendered math and code, with some context."""
    parser = _TextOutsideMath()
    parser.feed(html)
    text = "".join(parser.parts)
    return [text[max(0, m.start() - 40):m.end() + 40] for m in _RAW_MATH.finditer(text)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The project's site built once with ``mkdocs build --strict``: its folder and ``{path: html}``."""
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return site, {p: p.read_text(encoding="utf-8") for p in site.rglob("*.html")}


def test_site_builds_strictly_and_offline(site):
    site, pages = site
    # MathJax comes from the site itself, and no page loads a script, stylesheet or font from elsewhere.
    assert (site / "javascripts" / "mathjax" / "tex-chtml.js").is_file()
    assert list((site / "javascripts" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    remote = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)=\"(?:https?:)?//[^\"]*\"[^>]*>")
    for path, html in pages.items():
        loads = [tag for tag in remote.findall(html) if "<script" in tag or "stylesheet" in tag or "preconnect" in tag]
        assert not loads, f"{path.relative_to(site)} loads remote resources: {loads}"
    # The docstrings' Sphinx markup was turned into MathJax input and Markdown, not printed literally.
    api = "".join(html for path, html in pages.items() if path.relative_to(site).parts[0] == "api")
    assert 'class="arithmatex"' in api
    assert ":math:" not in api and ".. math::" not in api and "``" not in api


def test_every_formula_is_rendered_math(site):
    site, pages = site
    assert sum('class="arithmatex"' in html for html in pages.values()) >= 10
    found = {str(path.relative_to(site)): hits for path, html in pages.items() if (hits := raw_math(html))}
    assert not found, found


def test_long_api_signatures_are_formatted_on_several_lines(site):
    # mkdocstrings formats signatures with Ruff (or Black) when one is installed, else prints one long line.
    site, pages = site
    html = pages[site / "api" / "nystrom" / "index.html"]
    signature = re.search(r'<div class="doc-signature[^"]*">(.*?)</div>', html, re.S)
    assert signature and signature[1].count("\n") >= 3


def _build_pages(tmp_path, pages):
    """Build ``pages`` (name to Markdown) with the project's theme and Markdown extensions; returns their HTML."""
    import yaml
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    project = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in pages.items():
        (docs / name).write_text(text, encoding="utf-8")
    config = {"site_name": "planted", "docs_dir": str(docs), "site_dir": str(tmp_path / "site"),
              "theme": project["theme"], "markdown_extensions": project["markdown_extensions"], "plugins": []}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    build(load_config(str(tmp_path / "mkdocs.yml")))
    return {name: (tmp_path / "site" / ("index.html" if name == "index.md" else f"{name[:-3]}/index.html"))
            .read_text(encoding="utf-8") for name in pages}


def test_raw_math_check_catches_a_display_formula_glued_to_a_list_item(tmp_path):
    glued = "1. Rows sum to one:\n   \\[\n   F A^{-1}\\mathbf 1 = \\mathbf 1 .\n   \\]\n2. Next.\n"
    separated = "1. Rows sum to one:\n\n    \\[\n    F A^{-1}\\mathbf 1 = \\mathbf 1 .\n    \\]\n\n2. Next.\n"
    inline = "Inline \\(x^2\\), and in code `\\[ not math \\]` and `$$`.\n"
    html = _build_pages(tmp_path, {"index.md": glued, "separated.md": separated, "inline.md": inline})
    assert raw_math(html["index.md"]), "a display formula printed as text went unnoticed"
    assert not raw_math(html["separated.md"]) and 'class="arithmatex"' in html["separated.md"]
    assert not raw_math(html["inline.md"])
    assert raw_math("<p>Plain $$x$$ and \\begin{aligned}</p>") and raw_math("<li>\\[ x \\]</li>")


def test_every_public_module_function_class_and_method_has_a_docstring():
    # Public: not underscored, defined in the module (not imported into it). Methods may inherit their
    # docstring from the base class that declares them (inspect.getdoc looks there).
    import importlib
    import inspect
    import pkgutil

    import nystrom

    missing = []
    for info in pkgutil.walk_packages(nystrom.__path__, "nystrom."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        if not module.__doc__:
            missing.append(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not inspect.getdoc(obj):
                missing.append(f"{info.name}.{name}")
            if inspect.isclass(obj):
                methods = [m for m, f in vars(obj).items() if not m.startswith("_")
                           and (inspect.isfunction(f) or isinstance(f, (property, staticmethod, classmethod)))]
                missing += [f"{info.name}.{name}.{m}" for m in methods if not inspect.getdoc(getattr(obj, m))]
    assert not missing, missing


def test_docstrings_hold_no_control_characters():
    # A LaTeX command such as \rfloor or \times in a docstring that is not raw becomes a carriage return or a
    # tab, and the rendered formula breaks without any warning.
    import ast

    found = []
    for path in sorted((REPO / "nystrom").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node, clean=False) or ""
                if any(ch in doc for ch in "\t\r\b\f\v\a"):
                    found.append(f"{path.relative_to(REPO)}:{getattr(node, 'name', '<module>')}")
    assert not found, found
