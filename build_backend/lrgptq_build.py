"""The build backend: scikit-build-core, after one check that the build can see the installed torch.

lrgptq's C++ ops are compiled against the torch they will run in (its headers and its ABI), so
torch is not a build requirement: pip's default build isolation would otherwise install another
torch (possibly another version, or a multi-GB CUDA build) into a throwaway environment and
build against that. Under isolation the installed torch is invisible, and the build stops here,
before anything is downloaded or compiled, with the one flag to add.
"""

from __future__ import annotations

import importlib.util

from scikit_build_core import build as _backend
from scikit_build_core.build import (  # noqa: F401  (the hooks that need no torch, unchanged)
    build_sdist,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

MESSAGE = (
    "lrgptq: this build cannot import torch. lrgptq compiles its ops against the torch installed in "
    "the environment you run, and pip's build isolation hides it. Install torch first, then:\n"
    "    pip install --no-build-isolation .\n"
)


def _require_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(MESSAGE)


def get_requires_for_build_wheel(config_settings=None):
    _require_torch()
    return _backend.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _require_torch()
    return _backend.get_requires_for_build_editable(config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _require_torch()
    return _backend.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _require_torch()
    return _backend.build_editable(wheel_directory, config_settings, metadata_directory)
