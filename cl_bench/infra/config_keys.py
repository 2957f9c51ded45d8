"""Which config keys change a run's results (resume compares the others away; the report groups by them)."""

from __future__ import annotations

# Top-level config keys that never change results: ignored when a resume compares configs and
# when the report groups runs into experiments.
NON_RESULT_KEYS = ("progress", "verbose", "logger", "cache", "threads", "distributed")
