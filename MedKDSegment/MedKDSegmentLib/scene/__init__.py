# noqa: N999 (Slicer names the package after its module, MedKDSegment + Lib)
"""The scene layer: MRML <-> engine, comparison display, job runner. Imports slicer (MRML), never qt."""
