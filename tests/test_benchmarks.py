"""Smoke test of the benchmark scripts: each runs at a tiny size and writes valid JSON.

No timing is asserted: timings belong in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_script(tmp_path: Path, script: str, *args: str) -> list[dict]:
  """Runs ``benchmarks/<script>`` with ``--tiny --json`` and returns its records.

  In this process, as ``__main__``: a subprocess would spend longer starting JAX than
  the tiny run takes.
  """
  out = tmp_path / f"{script}.json"
  argv = [str(BENCHMARKS / script), "--tiny", "--json", str(out), *args]
  saved_argv, saved_path = sys.argv, list(sys.path)
  sys.argv, sys.path[:0] = argv, [str(BENCHMARKS)]
  try:
    runpy.run_path(argv[0], run_name="__main__")
  except SystemExit as exit:
    assert exit.code in (0, None), exit.code
  finally:
    sys.argv, sys.path[:] = saved_argv, saved_path
  records = json.loads(out.read_text())
  assert isinstance(records, list) and records
  for record in records:
    assert {"name", "mode", "device"} <= record.keys(), record
    assert isinstance(record["name"], str) and isinstance(record["mode"], str)
    if "ratio" in record:
      assert isinstance(record["ratio"], float) and record["ratio"] > 0
  return records


def test_overhead(tmp_path):
  records = run_script(
    tmp_path, "overhead.py", "--dtypes", "float32", "--loops", "scan", "--variants", "bgn"
  )
  assert {r["mode"] for r in records} == {"none", "batch", "per_example"}
  assert all("ratio" in r and "peak_bytes" in r for r in records if r["mode"] != "none")
  assert all(r["extra_below_one_activation"] for r in records if r["mode"] != "none")


def test_op(tmp_path):
  records = run_script(tmp_path, "op.py", "--variants", "bgn", "--modes", "batch")
  check = [r for r in records if r["mode"] == "check"]
  assert len(check) == 1 and check[0]["check"] == "ok", check
  assert all(r["gb_per_s"] > 0 for r in records if r["mode"] not in ("check", "eager"))
  eager = {r["variant"]: r for r in records if r["mode"] == "eager"}
  assert set(eager) == {"bgn", "jit_identity"} and eager["bgn"]["us_per_call"] > 0


def test_compile(tmp_path):
  records = run_script(tmp_path, "compile.py", "--loops", "scan", "--modes", "batch")
  assert all(r["total_s"] > 0 for r in records)
  assert any("bgn_ratio" in r for r in records)


def test_peers(tmp_path):
  pytest.importorskip("torch")
  records = run_script(tmp_path, "peers.py", "--dtypes", "float32", "--impls", "eager")
  assert {r["mode"] for r in records} == {"none", "batch", "per_example"}


def test_peers_without_torch(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  records = run_script(tmp_path, "peers.py")
  assert len(records) == 1 and records[0]["mode"] == "skipped"
  assert "not installed" in records[0]["skipped"]


def test_reduction(tmp_path):
  records = run_script(tmp_path, "reduction.py", "--variants", "sum,bgn,bgn_per_example")
  assert [r["variant"] for r in records] == ["pass", "sum", "bgn", "bgn_per_example"]
  assert all("extra_us" in r for r in records if r["variant"] != "pass")


def test_models(tmp_path):
  # Each configuration timed is a compile: the toy LM is timed (per example, no warm-up
  # compile; the node count does not depend on the grouping), and both toy models'
  # nodes are counted from the lowered step only (--cost-only).
  toy = ["--dtypes", "float32", "--groupings", "per_example"]
  records = run_script(
    tmp_path, "models.py", "--models", "lm1b_small", *toy, "--placements", "block",
    "--no-warm-compile",
  )  # fmt: skip
  by_placement = {r["placement"]: r for r in records}
  assert set(by_placement) == {"none", "block"}
  assert by_placement["none"]["nodes"] == 0 and by_placement["block"]["nodes"] == 2
  # A node adds at least its reduction to the optimized step.
  assert by_placement["block"]["hlo_added"]["reduce"] >= 2
  assert all(r["peak_bytes"] > 0 and r["compile_total_s"] > 0 for r in records)
  assert "paired_ratio" in by_placement["block"]
  # The toy LM: 2 blocks of 6 Dense (query, key, value, out, 2 MLP) and the logits;
  # the toy ResNet: the stem, 2 blocks of 2 convolutions and one projection.
  counted = run_script(
    tmp_path, "models.py", "--models", "lm1b_small,resnet18", *toy, "--placements",
    "block,layer", "--cost-only",
  )  # fmt: skip
  nodes = {(r["model"], r["placement"]): r["nodes"] for r in counted}
  assert nodes == {
    ("lm1b_small", "none"): 0, ("lm1b_small", "block"): 2, ("lm1b_small", "layer"): 13,
    ("resnet18", "none"): 0, ("resnet18", "block"): 2, ("resnet18", "layer"): 6,
  }  # fmt: skip
