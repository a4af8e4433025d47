"""Markdown tables for the speed results pages (docs/results/speed-*) from the JSON
records of the benchmark scripts.

Usage::

  python benchmarks/report.py benchmarks/results/cpu_*.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

VARIANT_ORDER = [
  "naive",
  "two_pass",
  "masked_bands",
  "three_sums",
  "variadic",
  "bgn",
  "deferred",
]


def _ratio(record: dict[str, Any] | None) -> str:
  if record is None:
    return "-"
  paired = record.get("paired_ratio")
  text = f"{record['ratio']:.3f}"
  return text if paired is None else f"{text} ({paired:.3f})"


def overhead_table(records: list[dict[str, Any]]) -> list[str]:
  """One row per variant; columns: dtype x loop x mode; cells: ratio (paired ratio)."""
  columns = sorted(
    {(r["dtype"], r["loop"]) for r in records},
    key=lambda c: (c[0] != "float32", c[1] != "scan"),
  )
  modes = ["batch", "per_example"]
  by_key = {(r["variant"], r["dtype"], r["loop"], r["mode"]): r for r in records}
  header = "| variant | " + " | ".join(f"{d} {lp} {m}" for d, lp in columns for m in modes) + " |"
  lines = [header, "|---" * (1 + len(columns) * len(modes)) + "|"]
  baseline = ["| step without BGN (ms) |"]
  for d, lp in columns:
    base = by_key.get(("none", d, lp, "none"))
    cell = f" {base['ms_per_step']:.2f} |" if base else " - |"
    baseline.append(cell * len(modes))
  lines.append("".join(baseline))
  for variant in VARIANT_ORDER:
    if not any(r["variant"] == variant for r in records):
      continue
    cells = [_ratio(by_key.get((variant, d, lp, m))) for d, lp in columns for m in modes]
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  if any(r["variant"] == "deferred" for r in records):
    cells = []
    for d, lp in columns:
      for m in modes:
        r = by_key.get(("deferred", d, lp, m))
        cells.append(
          "-"
          if r is None
          else f"{r['ratio_vs_handwritten']:.3f} ({r['paired_ratio_vs_handwritten']:.3f})"
        )
    lines.append("| deferred / hand-written layer without BGN | " + " | ".join(cells) + " |")
  return lines


def memory_table(records: list[dict[str, Any]]) -> list[str]:
  lines = [
    "| dtype | loop | peak without BGN (MiB) | bgn batch: extra bytes | "
    "bgn per example: extra bytes | naive batch: extra bytes |",
    "|---|---|---|---|---|---|",
  ]
  by_key = {(r["variant"], r["dtype"], r["loop"], r["mode"]): r for r in records}
  for d, lp in sorted({(r["dtype"], r["loop"]) for r in records}):
    base = by_key.get(("none", d, lp, "none"))
    if base is None:
      continue
    cells = []
    for variant, mode in (("bgn", "batch"), ("bgn", "per_example"), ("naive", "batch")):
      r = by_key.get((variant, d, lp, mode))
      cells.append("-" if r is None else str(r["extra_peak_bytes"]))
    lines.append(f"| {d} | {lp} | {base['peak_bytes'] / 2**20:.2f} | " + " | ".join(cells) + " |")
  return lines


def op_table(records: list[dict[str, Any]]) -> list[str]:
  lines = [
    "| variant | mode | ms | ratio to g * c (paired) | GB/s (fewest bytes) |",
    "|---|---|---|---|---|",
  ]
  rows = [r for r in records if r["mode"] != "check"]
  order = ["scale", *VARIANT_ORDER]
  rows.sort(key=lambda r: (order.index(r["variant"]), r["mode"]))
  for r in rows:
    ratio = _ratio(r) if "ratio" in r else "1"
    lines.append(
      f"| {r['variant']} | {r['mode']} | {r['ms']:.3f} | {ratio} | {r['gb_per_s']:.1f} |"
    )
  checks = [r for r in records if r["mode"] == "check"]
  for r in checks:
    lines.append("")
    lines.append(f"Numerics check of bgn_jax.bgn on this device: {r['check']}.")
  return lines


def compile_table(records: list[dict[str, Any]]) -> list[str]:
  lines = [
    "| loop | mode | depth | lower s | compile s | total s | / smallest depth | / without BGN |",
    "|---|---|---|---|---|---|---|---|",
  ]
  # Recomputed here: a run cut short by its time limit wrote its records without them.
  totals = {(r["loop"], r["mode"], r["depth"]): r["total_s"] for r in records if "total_s" in r}
  for r in records:
    if "total_s" not in r:
      reason = r.get("skipped", "not reached in the time limit")
      lines.append(f"| {r['loop']} | {r['mode']} | {r['depth']} | skipped: {reason} ||||||")
      continue
    smallest = min(d for lp, m, d in totals if (lp, m) == (r["loop"], r["mode"]))
    ratio = r["total_s"] / totals[(r["loop"], r["mode"], smallest)]
    plain = totals.get((r["loop"], "none", r["depth"]))
    bgn_ratio = f"{r['total_s'] / plain:.2f}" if plain and r["mode"] != "none" else "-"
    lines.append(
      f"| {r['loop']} | {r['mode']} | {r['depth']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} "
      f"| {r['total_s']:.2f} | {ratio:.2f} | {bgn_ratio} |"
    )
  return lines


def peers_table(records: list[dict[str, Any]]) -> list[str]:
  if records and records[0]["mode"] == "skipped":
    return [records[0]["skipped"]]
  lines = [
    "| impl | dtype | step without BGN (ms) | whole batch | per example |",
    "|---|---|---|---|---|",
  ]
  by_key = {(r["impl"], r["dtype"], r["mode"]): r for r in records}
  for impl, dtype in sorted({(r["impl"], r["dtype"]) for r in records}):
    base = by_key[(impl, dtype, "none")]
    cells = [
      f"{by_key[(impl, dtype, m)]['ratio']:.3f}" if (impl, dtype, m) in by_key else "-"
      for m in ("batch", "per_example")
    ]
    lines.append(
      f"| torch {impl} | {dtype} | {base['ms_per_step']:.2f} | " + " | ".join(cells) + " |"
    )
  return lines


def reduction_table(records: list[dict[str, Any]]) -> list[str]:
  """One row per size; cells: microseconds a node adds per iteration (ratio to the pass)."""
  variants = [v for v in dict.fromkeys(r["variant"] for r in records) if v != "pass"]
  by_key = {(r["n"], r["variant"]): r for r in records}
  header = "| n x n | KiB | elementwise pass (us) | " + " | ".join(variants) + " |"
  lines = [header, "|---" * (3 + len(variants)) + "|"]
  for n in sorted({r["n"] for r in records}):
    base = by_key[(n, "pass")]
    cells = [
      f"+{by_key[(n, v)]['extra_us']:.1f} ({by_key[(n, v)]['ratio']:.2f})"
      if (n, v) in by_key
      else "-"
      for v in variants
    ]
    lines.append(
      f"| {n} | {base['bytes'] / 1024:.0f} | {base['us_per_iteration']:.2f} | "
      + " | ".join(cells)
      + " |"
    )
  return lines


MODEL_COLUMNS = [
  ("block", "batch"),
  ("block", "per_example"),
  ("layer", "batch"),
  ("layer", "per_example"),
]


def _model_rows(records: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
  """(model, dtype, records by "placement/mode") in the order the script ran them."""
  rows: dict[tuple[str, str], dict[str, Any]] = {}
  for r in records:
    rows.setdefault((r["model"], r["dtype"]), {})[f"{r['placement']}/{r['mode']}"] = r
  return [(model, dtype, cells) for (model, dtype), cells in rows.items()]


def _size(record: dict[str, Any]) -> str:
  if "image" in record:
    return f"batch {record['batch']}, {record['image']}x{record['image']}"
  return f"batch {record['batch']} x {record['length']} tokens"


def models_table(records: list[dict[str, Any]]) -> list[str]:
  """One row per model and dtype; cells: ratio (paired ratio) and the node count."""
  header = "| model | dtype | size | step without BGN (ms) | "
  header += " | ".join(f"{p} {m}" for p, m in MODEL_COLUMNS) + " |"
  lines = [header, "|---" * (4 + len(MODEL_COLUMNS)) + "|"]
  for model, dtype, cells in _model_rows(records):
    base = cells["none/none"]
    row = [model, dtype, _size(base), f"{base['ms_per_step']:.1f}"]
    for placement, mode in MODEL_COLUMNS:
      r = cells.get(f"{placement}/{mode}")
      row.append("-" if r is None else f"{_ratio(r)}, {r['nodes']} nodes")
    lines.append("| " + " | ".join(row) + " |")
  return lines


def _compile_s(record: dict[str, Any]) -> float:
  # The compiler's CPU seconds where recorded: wall seconds on a loaded machine are
  # mostly waiting.
  return record.get("compile_cpu_s", record["compile_total_s"])


def models_cost_table(records: list[dict[str, Any]]) -> list[str]:
  """Peak memory and compile time without BGN, and what each placement adds."""
  header = "| model | dtype | peak without BGN (MiB) | compile without BGN (s) | "
  header += " | ".join(f"{p} {m}: extra KiB, compile x" for p, m in MODEL_COLUMNS) + " |"
  lines = [header, "|---" * (4 + len(MODEL_COLUMNS)) + "|"]
  for model, dtype, cells in _model_rows(records):
    base = cells["none/none"]
    # "wall": a record without the compiler's CPU seconds (an older models.py).
    unit = "CPU" if "compile_cpu_s" in base else "wall"
    row = [model, dtype, f"{base['peak_bytes'] / 2**20:.1f}", f"{_compile_s(base):.1f} {unit}"]
    for placement, mode in MODEL_COLUMNS:
      r = cells.get(f"{placement}/{mode}")
      if r is None:
        row.append("-")
        continue
      if r.get("compile_cpu_s", 0.0) is None:  # compiled side by side (--compile-threads)
        row.append(f"{r['extra_peak_bytes'] / 1024:+.1f}, side by side")
        continue
      row.append(f"{r['extra_peak_bytes'] / 1024:+.1f}, {_compile_s(r) / _compile_s(base):.2f}")
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  commits = ", ".join(dict.fromkeys(r.get("commit", "?") for r in records))
  lines.append(f"HEAD when run (+dirty: bgn_jax/ or benchmarks/ uncommitted): {commits}.")
  lines.append("The 1-minute load average when each model and dtype started and ended its")
  lines.append("timed rounds:")
  lines.append(
    "; ".join(
      f"{model} {dtype} {cells['none/none']['load_average_start'][0]:.1f}"
      f" -> {cells['none/none']['load_average_end'][0]:.1f}"
      for model, dtype, cells in _model_rows(records)
    )
    + "."
  )
  return lines


def load(paths: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
  """Records grouped by the script that wrote them (the first part of ``name``)."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for path in paths:
    with open(path) as f:
      for record in json.load(f):
        groups.setdefault(record["name"].split("/")[0], []).append(record)
  return groups


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("paths", nargs="+", help="JSON files written by the benchmark scripts")
  args = parser.parse_args(argv)
  groups = load(args.paths)
  sections = {
    "overhead": ("Step-time ratio, with BGN / without: ratio of medians (paired)", overhead_table),
    "op": ("The backward alone", op_table),
    "compile": ("Compile time", compile_table),
    "peers": ("PyTorch peers: step-time ratio, with BGN / without", peers_table),
    "reduction": ("What a node adds to an elementwise pass, per iteration", reduction_table),
    "models": ("Real models: step-time ratio, with BGN / without (paired)", models_table),
  }
  for key, (title, table) in sections.items():
    if key not in groups:
      continue
    first = groups[key][0]
    versions = first.get("framework") or f"jax {first.get('jax_version', '-')}"
    print(f"### {title} ({first.get('device', '?')}, {versions})\n")
    print("\n".join(table(groups[key])))
    print()
    if key == "overhead":
      print("### Peak memory from memory_analysis()\n")
      print("\n".join(memory_table(groups[key])))
      print()
    if key == "models":
      print("### Real models: peak memory and compile time\n")
      print("\n".join(models_cost_table(groups[key])))
      print()


if __name__ == "__main__":
  main()
