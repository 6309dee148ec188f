"""MedKDSegment library: the engine (no Slicer) and the Slicer scene layer."""

__version__ = "0.1.0"
