"""Test-only stand-in for ``slicer.i18n`` (Qt-based in Slicer, absent from the slicer-core wheel).

This folder has no ``__init__.py`` on purpose: the wheel's ``slicer`` package extends its
path with every ``slicer/`` folder on ``sys.path`` and imports the modules it finds there.
"""


def tr(text: str) -> str:
    return text


def translate(context: str, text: str) -> str:
    return text


def getContext(sourceFile: str) -> str:
    return sourceFile
