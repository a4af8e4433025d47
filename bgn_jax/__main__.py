"""``python -m bgn_jax``: the ``bgn-jax`` command line."""

from bgn_jax.experiments.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
