"""A griffe extension for the API reference: the docstrings' reST, read as Markdown.

The docstrings write ``:func:`insert``` and ``:class:`bgn_jax.BGN``` (the optax
convention) and, here and there, a reST simple table. mkdocstrings renders Markdown,
where both would show as raw text. Each role becomes an optional cross-reference,
resolved against the object's own module first, then against the ``bgn_jax`` package;
a name that is not rendered on the site (``flax.linen.intercept_methods``) stays code,
without a warning. Each simple table becomes a Markdown table.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`~?([\w.]+)`")
_BORDER = re.compile(r"^( *)=+( +=+)+ *$")


def _columns(border: str) -> list[tuple[int, int]]:
  return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, columns: list[tuple[int, int]]) -> list[str]:
  # The last column runs to the end of the line, as reST allows.
  ends = [start for start, _ in columns[1:]] + [len(line)]
  return [line[start:end].strip() for (start, _), end in zip(columns, ends, strict=True)]


def _markdown_tables(text: str) -> str:
  """reST simple tables (a border, a header, a border, rows, a border) as Markdown.

  A row whose first cell is empty continues the row above it.
  """
  lines = text.split("\n")
  out: list[str] = []
  i = 0
  while i < len(lines):
    borders = [i]
    if _BORDER.match(lines[i]):
      borders += [j for j in range(i + 1, len(lines)) if lines[j].strip() == lines[i].strip()]
    if len(borders) < 3 or borders[1] != i + 2:
      out.append(lines[i])
      i += 1
      continue
    columns = _columns(lines[i])
    rows: list[list[str]] = []
    for line in lines[borders[1] + 1 : borders[2]]:
      cells = _cells(line, columns)
      if rows and not cells[0]:
        rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
      else:
        rows.append(cells)
    header = _cells(lines[i + 1], columns)
    indent = _BORDER.match(lines[i])[1]
    for row in [header, ["---"] * len(columns), *rows]:
      out.append(indent + "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    i = borders[2] + 1
  return "\n".join(out)


def _identifier(name: str, obj: griffe.Object, package: griffe.Object) -> str:
  """The rendered path of ``name``: aliases (``bgn_jax.BGN``) lead to their target."""
  if name.startswith(f"{package.path}."):
    candidates = [(package, name.removeprefix(f"{package.path}."))]
  elif "." in name:
    return name
  else:
    scopes = (obj if obj.is_class else obj.parent, obj.module, package)
    candidates = [(scope, name) for scope in scopes if scope is not None]
  for scope, relative in candidates:
    try:
      member = scope[relative]
    except (KeyError, griffe.AliasResolutionError):
      continue
    try:
      return member.target_path if member.is_alias else member.path
    except griffe.AliasResolutionError:
      return member.path
  return name


class SphinxRoles(griffe.Extension):
  """Rewrites Sphinx roles in every docstring of a package into optional autorefs."""

  def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
    for obj in _walk(pkg):
      if obj.docstring is None:
        continue
      obj.docstring.value = _ROLE.sub(
        lambda m, obj=obj: (
          f'<autoref identifier="{_identifier(m[1], obj, pkg)}" optional>'
          f"<code>{m[1]}</code></autoref>"
        ),
        _markdown_tables(obj.docstring.value),
      )


def _walk(obj: griffe.Object):
  yield obj
  for member in obj.members.values():
    if not member.is_alias:
      yield from _walk(member)
