"""Tests of the research instruments, outside the default suite: `python -m pytest research/tests`."""
