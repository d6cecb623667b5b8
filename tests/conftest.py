"""Hypothesis settings shared by the whole test suite: deterministic examples, no per-example deadline."""

from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci")
