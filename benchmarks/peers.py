"""The same BGN overhead measured on the peers' side: PyTorch ``autograd.Function``s.

The model and step are those of ``overhead.py`` (tanh MLP, depth 50, SGD on a mean
squared error), written in PyTorch, with a BGN node after every layer as the public
implementations write it:

- ``batch``: the whole-batch reading of llm-random's ``grad_norm``:
  ``g * sqrt(units) / ||g||`` over the whole cotangent;
- ``per_example``: the per-example reading of Sombressoul/dyna:
  ``g * sqrt(units) / (||g_i|| + 1e-6)`` per row (with the peers' additive eps).

Each runs eagerly and under ``torch.compile``; ``ratio`` is the step time with BGN
over the same PyTorch model's step time without it (same dtype, same execution
mode), timed in interleaved rounds, median sample. Without PyTorch the script
writes one record saying it was skipped and exits 0.

Usage::

  python benchmarks/peers.py --quick --json peers.json     # CPU, width 256
  python benchmarks/peers.py --json peers.json             # width 1024 on GPU
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Any

import harness

try:
  import torch
except ImportError:  # the benchmark is optional; the library never needs torch
  torch = None


def make_bgn_function(mode: str) -> Any:
  """The peers' BGN node as a ``torch.autograd.Function`` (identity forward)."""

  class WholeBatchBGN(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
      return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
      return g * (math.sqrt(g[0].numel()) / torch.linalg.vector_norm(g))

  class PerExampleBGN(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
      return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
      norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
      return g * (math.sqrt(g[0].numel()) / (norm + 1e-6))

  return {"batch": WholeBatchBGN, "per_example": PerExampleBGN}[mode]


class MLP(torch.nn.Module if torch is not None else object):
  """``depth`` tanh layers of ``width`` units, each followed by ``node`` (or nothing)."""

  def __init__(self, depth: int, width: int, node: Any) -> None:
    super().__init__()
    self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
    for layer in self.layers:
      torch.nn.init.normal_(layer.weight, std=1 / math.sqrt(width))
      torch.nn.init.zeros_(layer.bias)
    self.node = node

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    for layer in self.layers:
      h = torch.tanh(layer(h))
      if self.node is not None:
        h = self.node.apply(h)
    return h


def make_step(model: Any, forward: Any, x: Any, y: Any) -> Any:
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

  def step() -> Any:
    optimizer.zero_grad(set_to_none=True)
    diff = forward(x).float() - y
    loss = 0.5 * (diff * diff).mean()
    loss.backward()
    optimizer.step()
    return loss

  return step


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="width/batch 256, fewer rounds")
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--json", default=None, help="write the records here")
  parser.add_argument("--depth", type=int, default=50)
  parser.add_argument("--width", type=int, default=None, help="default 1024 on GPU, else 256")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--impls", default="eager,compile", help="eager and/or torch.compile")
  parser.add_argument("--compile-dtypes", default="float32", help="dtypes run compiled")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--steps-per-round", type=int, default=None)
  parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
  args = parser.parse_args(argv)

  if torch is None:
    message = "skipped: PyTorch is not installed (pip install torch to run this benchmark)"
    print(f"peers: {message}")
    harness.write_json(
      args.json,
      [{"name": "peers", "mode": "skipped", "device": platform.machine(), "skipped": message}],
    )
    return

  cuda = torch.cuda.is_available()
  # XLA flushes subnormals to zero on the CPU; without this the plain model's
  # vanishing gradients take x86's slow subnormal path and the ratio means nothing.
  torch.set_flush_denormal(True)
  if args.threads:
    # On a shared machine OpenMP's spinning barriers turn 2 threads erratic.
    torch.set_num_threads(args.threads)
  device = torch.device("cuda" if cuda else "cpu")
  device_name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
  print(f"peers: torch {torch.__version__} on {device_name}", flush=True)
  if args.tiny:
    args.depth, width, rounds, steps = 3, 16, 2, 1
  else:
    width = args.width or (1024 if cuda and not args.quick else 256)
    rounds = args.rounds or (10 if args.quick else 21)
    steps = args.steps_per_round or (10 if cuda else 2)
  impls = harness.parse_list(args.impls)
  compile_dtypes = harness.parse_list(args.compile_dtypes)

  records = []
  for dtype_name in harness.parse_list(args.dtypes):
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(width, width, generator=gen).to(device, dtype)
    y = torch.randn(width, width, generator=gen).to(device)
    runs = {}
    for impl in impls:
      if impl == "compile" and dtype_name not in compile_dtypes:
        continue
      for mode in ("none", "batch", "per_example"):
        torch.manual_seed(0)
        node = None if mode == "none" else make_bgn_function(mode)
        model = MLP(args.depth, width, node).to(device, dtype)
        forward = torch.compile(model) if impl == "compile" else model
        step = make_step(model, forward, x, y)
        start = time.perf_counter()
        for _ in range(3):  # warm-up; the first compiled call compiles
          step()
        if cuda:
          torch.cuda.synchronize()
        print(
          f"  {dtype_name} {impl} {mode}: ready in {time.perf_counter() - start:.1f} s", flush=True
        )
        runs[(impl, mode)] = step

    samples: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
      for key, step in runs.items():
        start = time.perf_counter()
        for _ in range(steps):
          step()
        if cuda:
          torch.cuda.synchronize()
        samples[key].append((time.perf_counter() - start) / steps)
    for (impl, mode), values in samples.items():
      median = statistics.median(values)
      record = {
        "name": f"peers/torch_{impl}/{dtype_name}/{mode}",
        "mode": mode,
        "device": device_name,
        "framework": f"torch {torch.__version__}",
        "impl": impl,
        "dtype": dtype_name,
        "depth": args.depth,
        "width": width,
        "batch": width,
        "ms_per_step": 1e3 * median,
        "samples": len(values),
        "steps_per_sample": steps,
      }
      if mode != "none":
        base = statistics.median(samples[(impl, "none")])
        record["ratio"] = median / base
        record["baseline_ms_per_step"] = 1e3 * base
      records.append(record)
    harness.write_json(args.json, records)

  print(f"{'impl':8} {'dtype':9} {'mode':12} {'ms/step':>9} {'ratio':>7}")
  for r in records:
    ratio = f"{r['ratio']:.3f}" if "ratio" in r else "-"
    print(f"{r['impl']:8} {r['dtype']:9} {r['mode']:12} {r['ms_per_step']:9.3f} {ratio:>7}")


if __name__ == "__main__":
  main()
