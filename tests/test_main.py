"""The ``bgn-jax`` entry point and the package's dependencies: what runs without the extras."""

from __future__ import annotations

import importlib.metadata
import runpy
import subprocess
import sys

import pytest

from bgn_jax import __main__ as entry

# The extras' packages that `import bgn_jax` must not import. optax is not among them: flax
# depends on it and `flax.nnx` imports it.
EXTRA_MODULES = ("orbax", "chex", "equinox", "sklearn", "matplotlib", "tqdm")


def test_console_script_is_the_checked_entry_point():
  (script,) = importlib.metadata.entry_points(group="console_scripts", name="bgn-jax")
  assert script.value == "bgn_jax.__main__:main"


def test_python_m_without_the_cli_extra_one_line_and_exit_2(monkeypatch, capsys):
  # `python -m bgn_jax demo`, in this process: runpy runs bgn_jax/__main__.py as
  # __main__, as the interpreter does. A None entry in sys.modules makes the module
  # unimportable, as if it were not installed.
  monkeypatch.setitem(sys.modules, "sklearn", None)
  monkeypatch.delitem(sys.modules, "bgn_jax.__main__")  # imported above, as `entry`
  monkeypatch.setattr(sys, "argv", ["bgn-jax", "demo"])
  with pytest.raises(SystemExit) as exit_info:
    runpy.run_module("bgn_jax", run_name="__main__")
  out, err = capsys.readouterr()
  assert exit_info.value.code == 2, err
  assert out == ""
  assert err.count("\n") == 1, err
  assert 'pip install "bgn_jax[cli]"' in err
  assert "sklearn" in err


@pytest.mark.parametrize("blocked", entry.CLI_MODULES)
def test_each_missing_cli_module_is_named(blocked, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, blocked, None)
  assert entry.main(["demo"]) == 2
  out, err = capsys.readouterr()
  assert out == ""
  assert err.count("\n") == 1, err
  assert f"(missing: {blocked})" in err
  assert 'pip install "bgn_jax[cli]"' in err


def test_missing_cli_modules_empty_when_installed():
  assert entry.missing_cli_modules() == []


def test_with_the_cli_extra_main_runs_the_command_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    entry.main(["--help"])
  assert exit_info.value.code == 0
  assert "demo" in capsys.readouterr().out


def test_import_bgn_jax_imports_no_extra_and_the_equinox_adapter_says_what_to_install():
  # In a fresh interpreter: this one has imported the extras already.
  done = subprocess.run(
    [sys.executable, "-c", IMPORTS_NO_EXTRA, repr(EXTRA_MODULES)],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "[]"


IMPORTS_NO_EXTRA = """
import ast, sys
import bgn_jax
print(sorted(m for m in ast.literal_eval(sys.argv[1]) if m in sys.modules))
sys.modules["equinox"] = None  # equinox hidden: importing it raises ImportError
try:
  import bgn_jax.equinox
except ImportError as err:
  assert 'pip install "bgn_jax[equinox]"' in str(err), str(err)
else:
  raise SystemExit("bgn_jax.equinox imported without equinox")
"""
