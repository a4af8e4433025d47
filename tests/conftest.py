"""Shared pytest setup: the hypothesis profiles.

``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``) selects the "ci" profile: derandomized,
so every CI run draws the same examples, and no example database.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
