"""glmrt: a hardware-abstracted inference runtime for the GLM family of language models.

    import glmrt
    model = glmrt.load("synthetic:chatglm3-6b", layers=2)          # no download
    model = glmrt.load("/path/to/glm-4-9b-chat", backend="auto")    # a released checkpoint
    out = model.generate(input_ids, max_new_tokens=32)
"""

from __future__ import annotations

import os as _os

from ._bootstrap import prepare_torch_import as _prepare_torch_import

# Installed, backends/ and models/ are glmrt.backends and glmrt.models (see pyproject.toml). In a
# source checkout they sit beside this package, so let the package path see the checkout's root.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "backends")) and _os.path.isfile(
        _os.path.join(_root, "backends", "base.py")):
    __path__.append(_root)  # type: ignore[name-defined]

_prepare_torch_import()

from .api import list_backends, load  # noqa: E402
from .config import GLMConfig  # noqa: E402
from .errors import (BackendError, CheckpointError, ConfigError, GLMRTError, InputError,  # noqa: E402
                     UnsupportedModelError)
from .model import Model  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402  (imports onnx only when called)

__version__ = "0.1.0"

__all__ = ["load", "list_backends", "export_onnx", "Model", "GLMConfig", "GLMRTError", "ConfigError", "UnsupportedModelError",
           "CheckpointError", "BackendError", "InputError", "__version__"]
