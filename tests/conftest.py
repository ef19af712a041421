"""Hypothesis runs derandomized by default, so a CI run and a local run try the same examples and a failure
reproduces; ``pytest --hypothesis-profile=explore`` draws fresh examples, as for a search for new failures."""

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")
