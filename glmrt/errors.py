"""Errors glmrt raises for bad input. Every message names the problem and what to do about it."""

from __future__ import annotations


class GLMRTError(Exception):
    """Base class of every error glmrt raises on purpose."""


class ConfigError(GLMRTError, ValueError):
    """A config.json (or preset, or keyword) that glmrt cannot turn into a valid GLMConfig."""


class UnsupportedModelError(ConfigError):
    """A model_type or architecture glmrt does not know."""


class CheckpointError(GLMRTError):
    """A checkpoint whose files are missing, truncated, corrupt, or disagree with the config."""


class BackendError(GLMRTError):
    """An unknown, unavailable or incompatible backend, or a kernel that cannot run a node."""


class StrictFallbackError(BackendError):
    """Raised by strict lowering when a node would fall back from the backend's own kernels."""


class InputError(GLMRTError, ValueError):
    """Bad arguments to a Model method: shapes, dtypes, a prompt longer than the model allows, ..."""
