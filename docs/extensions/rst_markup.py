"""Griffe extension: render the reStructuredText markup of ``nystrom``'s docstrings in mkdocstrings.

The library's numpy-style docstrings use Sphinx markup (``:math:`...```, ``.. math::`` blocks,
``:func:`name``` roles), which stays readable in ``help()`` and in editors. mkdocstrings renders
docstring text as Markdown, where that markup would show literally, so before rendering this
extension rewrites it into what the site's Markdown understands:

* ``:math:`x``` becomes ``\\(x\\)`` and a ``.. math::`` block becomes ``\\[ ... \\]``, which
  ``pymdownx.arithmatex`` (generic mode) hands to MathJax;
* ``text::`` before a literal block loses its second colon (the indented block is already code);
* a parameter type ``array, shape (..., n, d)`` becomes ``array of shape (..., n, d)``, which griffe
  shows as written instead of reading it as a Python tuple;
* a parameter or return type loses the double backticks of its inline literals (``out : Tensor, dtype
  of V``): griffe already shows the type as code, where they would print literally;
* ``:func:``, ``:class:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:`` and ``:obj:`` roles become
  optional autorefs links: a link when the target is rendered somewhere in the site, plain code
  otherwise (a leading ``~`` shows only the last name, as in Sphinx).

Enabled in ``mkdocs.yml`` under ``plugins.mkdocstrings.handlers.python.options.extensions``.
"""

from __future__ import annotations

import html
import re

import griffe

_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([^`<>]+?)(?:\(\))?`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>.*)$")
# "text::" before an indented literal block: Markdown shows the block as code by its indentation
# alone, so only the second colon has to go.
_LITERAL_MARKER = re.compile(r"(?<=\S)::[ \t]*$", flags=re.MULTILINE)
# "Q : array, shape (..., n, d)", or "array, shape (..., n)" alone as a return type: griffe reads a
# type that parses as Python as an expression, and this one parses as a tuple, shown as
# "(array, shape(..., n, d))".
_TYPE_SHAPE = re.compile(r"^(?P<head>[ \t]*(?:\w[\w, ]* : [^\n]*?|\w+)), (?P<word>shapes?) \(", flags=re.MULTILINE)
# "out : Tensor, dtype of ``V``": a parameter or return line of a numpy-style section (not indented).
_TYPED_NAME = re.compile(r"^(?P<head>\w[\w, ]* : )(?P<type>[^\n]*``[^\n]*)$", flags=re.MULTILINE)


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def convert_math_blocks(text: str) -> str:
    r"""Replace each ``.. math::`` directive (and its indented body) by a ``\[ ... \]`` block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["inline"].strip()] if match["inline"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > len(indent)):
            if lines[i].strip():
                body.append(lines[i].strip())
            i += 1
        # Blank lines around the block: arithmatex recognises display math as its own paragraph.
        out.extend(["", f"{indent}\\[", *(f"{indent}{b}" for b in body), f"{indent}\\]", ""])
    return "\n".join(out)


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """Full path of ``target`` as seen from ``obj`` (absolute, relative to a parent, or ``.sibling``)."""
    collection = obj.modules_collection
    candidates = []
    if target.startswith("."):
        package = obj.module.parent.path if obj.module.parent is not None else obj.module.path
        candidates.append(package + target)
    else:
        candidates.append(target)
        scope: griffe.Object | None = obj
        while scope is not None:
            candidates.append(f"{scope.path}.{target}")
            scope = scope.parent
    for path in candidates:
        try:
            found = collection.get_member(path)
        except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        if found is not None:
            try:
                return found.final_target.path if found.is_alias else found.path
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return found.path
    return None


def convert_roles(text: str, obj: griffe.Object) -> str:
    """Turn Sphinx cross-reference roles into optional autorefs (or plain code when unresolvable)."""

    def link(match: re.Match) -> str:
        short, target = match[1], match[2].strip()
        shown = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
        code = f"<code>{html.escape(shown)}</code>"
        path = _resolve(obj, target)
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return _ROLE.sub(link, text)


_DOUBLE_BACKQUOTED = re.compile(r"(``.+?``)", re.DOTALL)


def outside_literals(text: str, rewrite) -> str:
    """``rewrite`` applied to ``text`` outside its ````literal```` spans: a role written inside one (a docstring that
    shows the markup itself) stays as written."""
    return "".join(part if index % 2 else rewrite(part)
                   for index, part in enumerate(_DOUBLE_BACKQUOTED.split(text)))


def convert(text: str, obj: griffe.Object) -> str:
    """All rewrites, block math first (its bodies contain no roles)."""
    text = convert_math_blocks(text)
    text = _LITERAL_MARKER.sub(":", text)
    text = _TYPE_SHAPE.sub(r"\g<head> of \g<word> (", text)
    text = _TYPED_NAME.sub(lambda m: m["head"] + m["type"].replace("``", ""), text)
    return outside_literals(text, lambda part: convert_roles(_INLINE_MATH.sub(lambda m: f"\\({m[1]}\\)", part), obj))


class RstMarkup(griffe.Extension):
    """Rewrite every docstring of the loaded package once its object tree is complete."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        seen: set[int] = set()

        def visit(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
