"""Sampling loops, and the export of a run as a diffusers pipeline folder."""

from .export import export_pipeline, export_run
from .sampling import SampleResult, generate

__all__ = ["SampleResult", "export_pipeline", "export_run", "generate"]
