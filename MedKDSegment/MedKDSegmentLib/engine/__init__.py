"""The MedKDSegment engine: torch, MONAI, SimpleITK and numpy only.

One concept per module, as in MONAI: ``volume`` (I/O and geometry), ``profiles``
(preprocessing), ``phantom`` (synthetic data), ``networks``, ``bundle`` (model
files), ``inference``, ``losses``, ``training``, ``metrics``, ``report`` and
``cli``. Never import slicer, qt, ctk or vtk here.
"""
