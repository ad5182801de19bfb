"""Sampling loops, and the export of a run as a diffusers pipeline folder."""

from .export import export_pipeline
from .sampling import SampleResult, generate

__all__ = ["SampleResult", "export_pipeline", "generate"]
