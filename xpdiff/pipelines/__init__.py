"""Sampling loops."""

from .sampling import SampleResult, generate

__all__ = ["SampleResult", "generate"]
