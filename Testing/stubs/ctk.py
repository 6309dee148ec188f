"""Test-only stand-in for PythonQt's ``ctk`` module (see ``qt.py`` beside it)."""


def __getattr__(name: str):
    raise AttributeError(f"ctk.{name} is not available outside Slicer (the Widget cannot run under pytest)")
