"""Dependencies: checked on first use; outside Slicer a clear error; inside Slicer ask, then PyTorchUtils or pip."""

from __future__ import annotations

import sys
import types

import pytest
import slicer

from MedKDSegmentLib.engine.errors import MedKDError
from MedKDSegmentLib.scene import dependencies


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(dependencies, "_checked", False)
    calls = []
    answers = iter([["torch>=2.1", "monai>=1.3"], []])  # missing before the installation, nothing after
    monkeypatch.setattr(dependencies, "missing_requirements", lambda: next(answers))
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirement: calls.append(("pip", requirement)))
    return calls


def test_this_environment_has_what_the_module_needs():
    assert dependencies.missing_requirements() == []


def test_outside_slicer_missing_packages_are_an_error_with_the_command(fresh, monkeypatch):
    monkeypatch.delattr(slicer, "app", raising=False)
    with pytest.raises(MedKDError, match="pip install 'torch>=2.1' 'monai>=1.3'"):
        dependencies.ensure_dependencies()
    assert fresh == []


def test_in_slicer_the_user_is_asked_first_and_may_decline(fresh, monkeypatch):
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title: asked.append(text) or False)
    with pytest.raises(MedKDError, match="not installed"):
        dependencies.ensure_dependencies()
    assert "torch>=2.1" in asked[0] and fresh == []


def test_torch_through_pytorchutils_and_the_rest_through_pip_ensure(fresh, monkeypatch):
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title: True)

    class Logic:
        def torchInstalled(self):
            return False

        def installTorch(self, askConfirmation, torchVersionRequirement):
            fresh.append(("PyTorchUtils", askConfirmation, torchVersionRequirement))
            return types.SimpleNamespace(__version__="2.5")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, **kwargs: fresh.append(("pip_ensure", requirements, kwargs))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    dependencies.ensure_dependencies()
    assert fresh == [("PyTorchUtils", False, ">=2.1"),
                     ("pip_ensure", ["monai>=1.3"], {"prompt_install": False, "requester": "MedKDSegment"})]
    assert dependencies._checked


def test_without_the_pytorch_extension_torch_comes_from_pip(fresh, monkeypatch):
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title: True)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer before 5.12
    dependencies.ensure_dependencies()
    assert fresh == [("pip", "torch>=2.1"), ("pip", "monai>=1.3")]
