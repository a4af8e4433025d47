"""The ``bgn-jax`` command line and its experiments: demo, train, sweep.

The library (``bgn_jax``) never imports this subpackage; it needs the ``cli``
extra (scikit-learn, matplotlib, tqdm, orbax-checkpoint).
"""
