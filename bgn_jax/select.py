"""Which modules of a model a user means: the ``where`` argument of insert and grad_norms."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["Where", "matcher", "module_path"]

Where = type | tuple[type, ...] | Callable[[Any], bool] | str | re.Pattern


def module_path(module: Any) -> str:
  """The path of a bound linen module, its scope names joined with "/"."""
  path = getattr(module, "path", None)
  if path is None and getattr(module, "scope", None) is not None:
    path = module.scope.path
  return "/".join(str(p) for p in (path or ()))


def matcher(where: Where) -> Callable[[Any, str], bool]:
  """Turns a ``where`` into a test ``(module, path) -> bool``.

  Args:
    where: a module class or a tuple of them; a predicate ``module -> bool``; or
      a regular expression (str or compiled), searched in the "/"-joined path.

  Returns:
    The test.

  Raises:
    TypeError: ``where`` is none of the forms above.
    ValueError: ``where`` is a string that is not a valid regular expression.
  """
  if isinstance(where, type) or (
    isinstance(where, tuple) and where and all(isinstance(w, type) for w in where)
  ):
    classes = where
    return lambda module, path: isinstance(module, classes)
  if isinstance(where, str):
    try:
      where = re.compile(where)
    except re.error as err:
      raise ValueError(f"`where` {where!r} is not a valid regular expression: {err}.") from None
  if isinstance(where, re.Pattern):
    pattern = where
    return lambda module, path: pattern.search(path) is not None
  if callable(where):
    predicate = where
    return lambda module, path: bool(predicate(module))
  raise TypeError(
    f"`where` must be a Module class, a tuple of Module classes, a predicate "
    f"module -> bool, or a regular expression on the module path; got {where!r}."
  )
