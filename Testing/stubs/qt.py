"""Test-only stand-in for PythonQt's ``qt`` module, so that ``MedKDSegment.py`` imports under pytest.

The Widget (the only Qt user) never runs here; touching any Qt class fails loudly.
"""


def __getattr__(name: str):
    raise AttributeError(f"qt.{name} is not available outside Slicer (the Widget cannot run under pytest)")
