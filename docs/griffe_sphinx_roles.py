"""A griffe extension for the API reference: Sphinx roles in docstrings become links.

The docstrings write ``:func:`insert``` and ``:class:`bgn_jax.BGN``` (the optax
convention). mkdocstrings renders Markdown, where the role would show as text; this
turns each role into an optional cross-reference, resolved against the object's own
module first, then against the ``bgn_jax`` package. A name that is not rendered on
the site (``flax.linen.intercept_methods``) stays code, without a warning.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`~?([\w.]+)`")


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
        obj.docstring.value,
      )


def _walk(obj: griffe.Object):
  yield obj
  for member in obj.members.values():
    if not member.is_alias:
      yield from _walk(member)
