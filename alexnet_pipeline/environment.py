"""What the package is running on: versions, which PIL (Pillow-SIMD or not), JPEG library, GPUs."""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata

from . import __version__
from .image import pil_flavour


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# DALI's builds are one distribution per CUDA major version; the CPU machines install cuda120, the GPU round's
# bundle cuda130 (tools/gpu_bundle.sh).
DALI_DISTRIBUTIONS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")


def dali_version() -> str:
    """The installed DALI build, e.g. '2.4.0 (nvidia-dali-cuda130)', or 'not installed'."""
    for dist in DALI_DISTRIBUTIONS:
        version = _version(dist)
        if version != "not installed":
            return f"{version} ({dist})"
    return "not installed"


def gpus() -> list[str]:
    """Names of visible NVIDIA GPUs (empty without a driver); asks nvidia-smi, so torch is not imported."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split(" (UUID")[0] for line in out.splitlines() if line.startswith("GPU ")]


def report() -> dict[str, str]:
    """Versions and capabilities, as printed by `alexnet-prep --version`."""
    from PIL import features

    visible = gpus()
    return {
        "alexnet-pipeline": __version__,
        "python": platform.python_version(),
        "PIL": pil_flavour() + ("" if "SIMD" in pil_flavour() else "  (not SIMD: `make install` restores it)"),
        "libjpeg-turbo": "yes" if features.check_feature("libjpeg_turbo") else "no",
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "nvidia-dali": dali_version(),
        "webdataset": _version("webdataset"),
        "GPU": ", ".join(visible) if visible else "none visible",
    }
