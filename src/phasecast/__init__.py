"""Phasecast: live progress of long-running AI generation jobs."""

from phasecast.model import JobState, Phase, ProgressUpdate
from phasecast.tracker import ProgressTracker

__version__ = "0.1.0"

__all__ = ["JobState", "Phase", "ProgressTracker", "ProgressUpdate", "__version__"]
