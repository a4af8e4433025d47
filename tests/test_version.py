"""The version is written in one place, ``bgn_jax.__version__``: pyproject.toml reads it
from there, and CHANGELOG.md's topmost entry names it."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_version() -> str:
  """``bgn_jax.__version__`` as written in bgn_jax/__init__.py (read, not imported)."""
  tree = ast.parse((ROOT / "bgn_jax" / "__init__.py").read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
      isinstance(target, ast.Name) and target.id == "__version__" for target in node.targets
    ):
      assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
      return node.value.value
  raise AssertionError("bgn_jax/__init__.py sets no __version__")


def test_pyproject_reads_the_version_from_the_package():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in project["project"], "pyproject.toml must not repeat the version"
  assert "version" in project["project"]["dynamic"]
  dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
  assert dynamic == {"attr": "bgn_jax.__version__"}


def test_changelog_names_the_package_version():
  version = package_version()
  assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
  headings = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", (ROOT / "CHANGELOG.md").read_text(), re.M)
  assert headings, "CHANGELOG.md has no '## X.Y.Z' entry"
  assert headings[0] == version, (
    f"CHANGELOG.md's topmost entry is {headings[0]}, bgn_jax.__version__ is {version}"
  )
