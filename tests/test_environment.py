"""The install path: Pillow-SIMD stays in place after everything that depends on pillow."""

from importlib import metadata

import pytest

from alexnet_pipeline import environment
from alexnet_pipeline.image import pil_flavour


def test_pillow_simd_survives_matplotlib_and_tensorboard():
    """`make install` installs matplotlib and tensorboard, then Pillow-SIMD last: installing them after it would
    put plain Pillow back. Skipped only on a plain install without Pillow-SIMD."""
    import matplotlib  # noqa: F401
    import tensorboard  # noqa: F401

    try:
        metadata.version("pillow-simd")
    except metadata.PackageNotFoundError:
        pytest.skip("Pillow-SIMD is not installed here (a plain install); make install puts it in")
    assert pil_flavour().startswith("Pillow-SIMD"), pil_flavour()
    assert environment.report()["PIL"].startswith("Pillow-SIMD")


def test_the_dali_version_names_whichever_cuda_build_is_installed(monkeypatch):
    installed = {"nvidia-dali-cuda130": "2.4.0"}

    def version(dist):
        if dist not in installed:
            raise metadata.PackageNotFoundError(dist)
        return installed[dist]
    monkeypatch.setattr(environment.metadata, "version", version)
    assert environment.report()["nvidia-dali"] == "2.4.0 (nvidia-dali-cuda130)"
    installed.clear()
    assert environment.dali_version() == "not installed"
