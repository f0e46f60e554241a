"""Hypothesis profiles for the reliability suite.

- ``ci`` (the default): bounded so that the whole of ``tests/reliability`` runs in a few
  minutes on a 2-core machine; no example database is written.
- ``thorough``: many more examples per property, for a long search:
  ``pytest tests/reliability --hypothesis-profile=thorough``.

Both use ``derandomize=False`` and no deadline (the run time of one example depends on T
and on the machine's load, and is bounded by the strategies instead).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("ci", max_examples=12, deadline=None, database=None, suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=_SUPPRESS, print_blob=True)

# ``--hypothesis-profile`` is applied by hypothesis' pytest plugin (when this conftest is
# loaded early, i.e. ``tests/reliability`` is on the command line). Load ``ci`` only if no
# profile was chosen.
if settings.get_current_profile_name() == "default":
    settings.load_profile("ci")
