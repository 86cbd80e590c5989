"""One module per GLM generation: config mapping and checkpoint tensor-name map.

Each generation module provides:
  MODEL_TYPES        the config.json model_type values it may handle
  matches(raw)       whether a raw config.json dict is this generation's
  config_from_dict   raw dict -> GLMConfig (the one place a generation's differences are read)
  weight_map(cfg)    canonical parameter name -> checkpoint tensor name(s)
"""

from __future__ import annotations

import json
from types import ModuleType

from ..config import GLMConfig
from ..errors import ConfigError, GLMRTError, UnsupportedModelError
from . import chatglm, chatglm6b, glm130b, glm_hf
from .presets import PRESETS

GENERATIONS: tuple[ModuleType, ...] = (chatglm, chatglm6b, glm_hf, glm130b)


def known_model_types() -> list[str]:
    return sorted({t for g in GENERATIONS for t in g.MODEL_TYPES})


def generation_for(raw: dict) -> ModuleType:
    model_type = raw.get("model_type")
    for gen in GENERATIONS:
        if gen.matches(raw):
            return gen
    if model_type is None:
        raise UnsupportedModelError(
            "config.json has no model_type: glmrt cannot tell which GLM generation this is; expected one of "
            f"{', '.join(known_model_types())}")
    raise UnsupportedModelError(
        f"unknown model_type {model_type!r} in config.json: glmrt supports {', '.join(known_model_types())} "
        "(GLM-family models only)")


class _ReadLog(dict):
    """A config dict that remembers the keys read, so that a value the mapping cannot use
    (``"hidden_size": null``, a string for a number) is named in the error."""

    def __init__(self, raw: dict):
        super().__init__(raw)
        self.read: list = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.append(key)
        return super().get(key, default)


def config_from_dict(raw: dict) -> tuple[ModuleType, GLMConfig]:
    gen = generation_for(raw)
    log = _ReadLog(raw)
    try:
        return gen, gen.config_from_dict(log)
    except GLMRTError:
        raise
    except (TypeError, ValueError, ArithmeticError, AttributeError) as exc:
        key = next((k for k in reversed(log.read) if k in raw), None)
        where = f"{key!r} is {json.dumps(raw[key], default=str)}" if key is not None else "a value"
        raise ConfigError(f"config.json ({raw.get('model_type')}): {where}, which glmrt cannot read as the "
                          f"model's setting ({type(exc).__name__}: {exc}); use the config.json shipped with the "
                          "checkpoint") from exc


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise UnsupportedModelError(f"unknown synthetic preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


__all__ = ["GENERATIONS", "PRESETS", "config_from_dict", "generation_for", "known_model_types", "preset"]


def tokenizer_family(cfg: GLMConfig, directory) -> str | None:
    """Which glmrt.tokenizer family reads this checkpoint's tokenizer, decided from the generation
    and the files' contents (never from a directory name); None when the checkpoint has none."""
    from pathlib import Path
    d = Path(directory)
    gen = cfg.generation
    if gen in ("chatglm-6b", "glm-130b"):
        return gen if (d / "ice_text.model").is_file() else None
    if cfg.source_model_type in ("glm", "glm4"):
        return "hf" if (d / "tokenizer.json").is_file() else None
    model = d / "tokenizer.model"
    if not model.is_file():
        return "hf" if (d / "tokenizer.json").is_file() else None
    with open(model, "rb") as f:
        head = f.read(256)
    first_line = head.split(b"\n", 1)[0].split()
    if len(first_line) == 2 and first_line[1].isdigit():  # tiktoken ranks: "base64 rank" lines
        return "glm4"
    # ChatGLM2 and ChatGLM3 share config and SentencePiece model; ChatGLM3's tokenizer files
    # carry its role tokens.
    for name in ("tokenizer_config.json", "tokenization_chatglm.py"):
        p = d / name
        if p.is_file() and "<|observation|>" in p.read_text(errors="replace"):
            return "chatglm3"
    return "chatglm2"
