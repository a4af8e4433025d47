"""``python -m bgn_jax`` and ``bgn-jax``: the command line of :mod:`bgn_jax.experiments`.

The command line needs the packages of the ``cli`` extra, which the library does not:
without them it prints how to install them and exits 2 instead of failing on an import.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

# The import names of the `cli` extra in pyproject.toml.
CLI_MODULES = ("optax", "orbax.checkpoint", "sklearn", "matplotlib", "tqdm")
EXIT_USAGE = 2


def _is_installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # A dotted name whose parent package is missing.
    return False


def missing_cli_modules() -> list[str]:
  """The modules of the ``cli`` extra that cannot be imported."""
  return [module for module in CLI_MODULES if not _is_installed(module)]


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``bgn-jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  missing = missing_cli_modules()
  if missing:
    print(
      f"bgn-jax: the command line needs its extra (missing: {', '.join(missing)}): "
      'pip install "bgn_jax[cli]"',
      file=sys.stderr,
    )
    return EXIT_USAGE
  from bgn_jax.experiments.cli import main as cli_main

  return cli_main(argv)


if __name__ == "__main__":
  raise SystemExit(main())
