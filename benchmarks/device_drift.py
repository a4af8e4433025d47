"""Why 1-device and 8-device training curves part: rounding amplified, or the sharded norm?

Trains the command line's default digits MLP (``bgn-jax train --dataset digits --depth
10``: width 128, ReLU, LeCun init, Adam 1e-3, batch 128, 6 epochs = 66 steps, loss
logged at every step) three ways, with BGN and plain:

- ``one_device``: the reference;
- ``eight_devices``: the batch split over 8 virtual CPU devices, as the command line
  does on 8 devices (jit with NamedSharding);
- ``one_ulp``: one device, every initial parameter moved by one float32 ulp
  (``nextafter``): a perturbation of the size of a different summation order.

It prints, per pair, the largest relative gap of the training loss and the first step
at which it exceeds 1e-4. If ``one_ulp`` parts from ``one_device`` as early and as far
as ``eight_devices`` does, the parting is the training dynamics amplifying rounding,
not the sharded norm. Each run is a subprocess (the device count is fixed when JAX
starts); about two minutes on 2 cores.

    python benchmarks/device_drift.py --json benchmarks/results/cpu_device_drift.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def one_run(method: str, nudge: bool, out: str) -> None:
  """Runs in a child process: one training run, its metrics in ``out``."""
  import jax
  import jax.numpy as jnp

  from bgn_jax.experiments import train as train_module

  make_model = train_module.make_model

  def nudged_model(config, num_classes):
    model = make_model(config, num_classes)
    if nudge:
      init = model.init

      def nudged_init(*args, **kwargs):
        variables = init(*args, **kwargs)
        params = jax.tree.map(lambda p: jnp.nextafter(p, jnp.inf), variables["params"])
        return {**variables, "params": params}

      object.__setattr__(model, "init", nudged_init)  # flax modules are frozen dataclasses
    return model

  train_module.make_model = nudged_model
  config = train_module.TrainConfig(
    out=out, dataset="digits", depth=10, width=128, batch_size=128, method=method,
    epochs=6, log_every=1, progress=False, plots=False,
  )  # fmt: skip
  train_module.train(config)


def losses(folder: Path) -> dict[int, float]:
  records = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
  return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def parting(a: dict[int, float], b: dict[int, float]) -> dict[str, float | int | None]:
  steps = sorted(set(a) & set(b))
  gap = np.array([abs(a[s] - b[s]) / abs(a[s]) for s in steps])
  above = [s for s, g in zip(steps, gap, strict=True) if g > 1e-4]
  return {"max_gap": float(gap.max()), "first_step_above_1e-4": above[0] if above else None}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  parser.add_argument(
    "--child", nargs=3, metavar=("METHOD", "NUDGE", "OUT"), help=argparse.SUPPRESS
  )
  args = parser.parse_args()
  if args.child:
    method, nudge, out = args.child
    one_run(method, nudge == "ulp", out)
    return
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for method in ("bgn", "plain"):
      runs = {}
      for name, devices, nudge in (
        ("one_device", 1, "none"),
        ("eight_devices", 8, "none"),
        ("one_ulp", 1, "ulp"),
      ):
        out = Path(tmp) / f"{method}-{name}"
        flags = (
          f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
        )
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        command = [sys.executable, __file__, "--child", method, nudge, str(out)]
        subprocess.run(command, env=env, check=True, capture_output=True)
        runs[name] = losses(out)
      results[method] = {
        other: parting(runs["one_device"], runs[other]) for other in ("eight_devices", "one_ulp")
      }
      print(method, json.dumps(results[method]))
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
