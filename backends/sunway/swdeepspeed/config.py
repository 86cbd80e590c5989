"""DeepSpeed's inference and engine configs, read the way DeepSpeed 0.19 reads them.

What matches DeepSpeed (deepspeed/__init__.py, deepspeed/inference/config.py,
deepspeed/runtime/config_utils.py):
  * init_inference's ``config`` is None, a dict or the path of a JSON file; anything else is a
    ValueError. A key given both in ``config`` and in the keyword arguments with different values
    is a ValueError ("Conflicting argument ..."); equal values are fine.
  * unknown keys are refused, and so is a field given under both its name and its alias
    (``replace_with_kernel_inject`` and ``kernel_inject``, ``tensor_parallel`` and ``tp``,
    ``max_out_tokens`` and ``max_tokens``, ...), equal or not: pydantic's extra="forbid" does that.
  * a value of "auto" counts as not given (DeepSpeedConfigModel drops it).
  * the deprecated ``mp_size`` sets ``tensor_parallel.tp_size``; giving both raises, even when
    they agree (DeepSpeed asserts "Cannot provide deprecated parameter 'mp_size' and replacing
    parameter 'tensor_parallel.tp_size' together"). Same for ``mpu`` and ``tensor_parallel.mpu``.
  * dtype is a torch dtype or one of DeepSpeed's names ("fp16", "half", "torch.bfloat16", ...);
    default fp16. ``max_out_tokens`` must be > 0 (default 1024).

What glmrt does with each field is in INFERENCE_FIELDS: honoured, accepted without effect (it
only matters to DeepSpeed's own module injection), or accepted at its default only (a feature the
Sunway host runtime does not have: a clear error instead of silently ignoring it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ....errors import ConfigError


class DeepSpeedAssertionError(ConfigError, AssertionError):
    """Raised where DeepSpeed fails an ``assert``: an AssertionError, like DeepSpeed's, and a glmrt
    ConfigError (so also a ValueError)."""


class TrainingNotSupportedError(ConfigError, NotImplementedError):
    """The shim is an inference runtime: anything that would train raises this."""


# DeepSpeed's DtypeEnum: every name it accepts for each dtype.
DTYPE_NAMES = {
    torch.float16: ("torch.float16", "fp16", "float16", "half"),
    torch.float32: ("torch.float32", "fp32", "float32", "float"),
    torch.bfloat16: ("torch.bfloat16", "bf16", "bfloat16", "bfloat"),
    torch.int8: ("torch.int8", "int8"),
}

HONOURED = "honoured"
NO_EFFECT = "no effect"  # only steers DeepSpeed's module injection, which glmrt does not do
DEFAULT_ONLY = "default only"


@dataclass(frozen=True)
class FieldSpec:
    alias: str | None
    default: Any
    handling: str
    note: str = ""


# DeepSpeedInferenceConfig's fields (0.19), with what the shim does with each.
INFERENCE_FIELDS: dict[str, FieldSpec] = {
    "replace_with_kernel_inject": FieldSpec("kernel_inject", False, HONOURED,
                                            "True lowers strictly: every op must run a backend kernel"),
    "dtype": FieldSpec(None, torch.float16, HONOURED,
                       "the model dtype; torch.int8 means int8 weight-only quantization with fp16 activations"),
    "tensor_parallel": FieldSpec("tp", {}, HONOURED,
                                 "tp_size N splits heads and MLP width over N ranks (see tensor_parallel.py)"),
    "enable_cuda_graph": FieldSpec(None, False, DEFAULT_ONLY, "no graph capture on the Sunway host runtime"),
    "use_triton": FieldSpec(None, False, DEFAULT_ONLY, "no Triton on Sunway"),
    "triton_autotune": FieldSpec(None, False, NO_EFFECT),
    "zero": FieldSpec(None, {}, DEFAULT_ONLY, "ZeRO-Inference is not supported"),
    "triangular_masking": FieldSpec("tm", True, NO_EFFECT, "the GLM graph builds its own mask"),
    "moe": FieldSpec(None, {}, DEFAULT_ONLY, "GLM models have no mixture of experts"),
    "keep_module_on_host": FieldSpec(None, False, NO_EFFECT, "the Sunway host runtime keeps weights in host memory"),
    "quant": FieldSpec(None, {}, DEFAULT_ONLY, "use dtype=torch.int8, or glmrt.load(quantize=...)"),
    "checkpoint": FieldSpec(None, None, DEFAULT_ONLY,
                            "DeepSpeed checkpoints are not read: pass a checkpoint directory as the model"),
    "base_dir": FieldSpec(None, "", DEFAULT_ONLY, "see checkpoint"),
    "set_empty_params": FieldSpec(None, False, NO_EFFECT),
    "save_mp_checkpoint_path": FieldSpec(None, None, DEFAULT_ONLY, "no DeepSpeed checkpoint is written"),
    "checkpoint_config": FieldSpec("ckpt_config", {}, DEFAULT_ONLY, "see checkpoint"),
    "return_tuple": FieldSpec(None, True, NO_EFFECT),
    "training_mp_size": FieldSpec(None, 1, NO_EFFECT),
    "replace_method": FieldSpec(None, "auto", NO_EFFECT, "deprecated in DeepSpeed too"),
    "injection_policy": FieldSpec("injection_dict", None, NO_EFFECT),
    "injection_policy_tuple": FieldSpec(None, None, NO_EFFECT),
    "config": FieldSpec("args", None, NO_EFFECT),
    "max_out_tokens": FieldSpec("max_tokens", 1024, HONOURED, "prompt + new tokens per sequence, at most"),
    "min_out_tokens": FieldSpec("min_tokens", 1, HONOURED, "must not exceed max_out_tokens"),
    "transposed_mode": FieldSpec(None, False, NO_EFFECT),
    # Deprecated in DeepSpeed; each sets its replacing parameter.
    "mp_size": FieldSpec(None, 1, HONOURED, "deprecated: tensor_parallel.tp_size"),
    "mpu": FieldSpec(None, None, HONOURED, "deprecated: tensor_parallel.mpu"),
    "ep_size": FieldSpec(None, 1, DEFAULT_ONLY, "deprecated: moe.ep_size"),
    "ep_group": FieldSpec("expert_group", None, DEFAULT_ONLY, "deprecated: moe.ep_group"),
    "ep_mp_group": FieldSpec("expert_mp_group", None, DEFAULT_ONLY, "deprecated: moe.ep_mp_group"),
    "moe_experts": FieldSpec(None, [1], DEFAULT_ONLY, "deprecated: moe.moe_experts"),
    "moe_type": FieldSpec(None, "standard", DEFAULT_ONLY, "deprecated: moe.type"),
}

# DeepSpeedTPConfig's fields.
TP_FIELDS: dict[str, Any] = {"enabled": True, "tp_size": 1, "tp_grain_size": 64, "mpu": None, "tp_group": None}

# Deprecated field -> (sub-config, field of the sub-config it sets).
DEPRECATED_TP = {"mp_size": "tp_size", "mpu": "mpu"}


@dataclass(frozen=True)
class InferenceConfig:
    """The resolved init_inference config: what glmrt uses, plus every field as given."""

    dtype: torch.dtype = torch.float16
    tp_size: int = 1
    replace_with_kernel_inject: bool = False
    max_out_tokens: int = 1024
    min_out_tokens: int = 1
    mpu: Any = None
    tp_group: Any = None
    given: dict = field(default_factory=dict)  # canonical name -> value, as the caller gave it

    @property
    def quantize(self) -> str | None:
        """The glmrt quantization DeepSpeed's int8 dtype maps to."""
        return "int8" if self.dtype == torch.int8 else None

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float16 if self.dtype == torch.int8 else self.dtype


def parse_dtype(value: Any) -> torch.dtype:
    """DeepSpeed's dtype rules: a torch dtype, or a name from its DtypeEnum."""
    if isinstance(value, torch.dtype):
        if value not in DTYPE_NAMES:
            raise ConfigError(f"dtype {value} is not one DeepSpeed inference takes: use torch.half, torch.bfloat16, "
                              "torch.float or torch.int8")
        return value
    if isinstance(value, str):
        for dtype, names in DTYPE_NAMES.items():
            if value in names:
                return dtype
        raise ConfigError(f"'{value}' is not a valid DtypeEnum (DeepSpeed's dtype names: "
                          f"{', '.join(n for names in DTYPE_NAMES.values() for n in names)})")
    raise TypeError(f"Invalid type for dtype: {type(value)}")


def load_config(config: Any, what: str = "config") -> dict:
    """None -> {}, a dict -> a copy, a str / path -> its JSON; anything else is a ValueError."""
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        with open(config, "r") as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{what} file {os.fspath(config)!r} does not hold a JSON object")
        return loaded
    if isinstance(config, dict):
        return dict(config)
    raise ValueError(f"'{what}' argument expected string or dictionary, got {type(config)}")


def merge_config_and_kwargs(config: Any, kwargs: dict) -> dict:
    """DeepSpeed's init_inference merge: kwargs win, but a key in both must have one value."""
    config_dict = load_config(config)
    for key in sorted(set(config_dict) & set(kwargs)):
        if config_dict[key] != kwargs[key]:
            raise ValueError(f"Conflicting argument '{key}' in 'config':{config_dict[key]} and kwargs:{kwargs[key]}")
    config_dict.update(kwargs)
    return config_dict


def _canonical_fields(data: dict, fields: dict[str, FieldSpec], where: str) -> dict:
    """Map aliases to field names; refuse unknown keys and name + alias pairs (DeepSpeed's
    pydantic models forbid extra inputs, and a field's name next to its alias is one)."""
    by_alias = {spec.alias: name for name, spec in fields.items() if spec.alias}
    out: dict = {}
    for key, value in data.items():
        if value == "auto" and key != "replace_method":
            continue  # DeepSpeedConfigModel drops "auto" values
        name = by_alias.get(key, key)
        if name not in fields:
            raise ConfigError(f"{where}: unknown field {key!r} (extra inputs are not permitted; known fields: "
                              f"{', '.join(sorted(fields))})")
        if name in out:
            alias = fields[name].alias
            raise ConfigError(f"{where}: {name!r} and its alias {alias!r} are both given (extra inputs are not "
                              "permitted): give one")
        out[name] = value
    return out


def _tensor_parallel(value: Any) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):  # a DeepSpeedTPConfig object, or anything with its fields
        value = {k: getattr(value, k) for k in TP_FIELDS if hasattr(value, k)}
    unknown = sorted(set(value) - set(TP_FIELDS))
    if unknown:
        raise ConfigError(f"tensor_parallel: unknown field(s) {', '.join(map(repr, unknown))} (known: "
                          f"{', '.join(TP_FIELDS)})")
    return dict(value)


def parse_inference_config(config: Any = None, **kwargs: Any) -> InferenceConfig:
    """init_inference(model, config, **kwargs)'s config, resolved as DeepSpeed resolves it."""
    merged = _canonical_fields(merge_config_and_kwargs(config, kwargs), INFERENCE_FIELDS, "init_inference")
    tp = _tensor_parallel(merged.get("tensor_parallel"))
    for old, new in DEPRECATED_TP.items():
        if old in merged:
            if new in tp:
                raise DeepSpeedAssertionError(f"Cannot provide deprecated parameter '{old}' and replacing parameter "
                                              f"'tensor_parallel.{new}' together")
            tp[new] = merged[old]

    for name, value in merged.items():
        spec = INFERENCE_FIELDS[name]
        if spec.handling == DEFAULT_ONLY and not _is_off(name, value, spec.default):
            raise ConfigError(f"init_inference: {name}={value!r} is not supported by glmrt's Sunway runtime "
                              f"({spec.note})")

    tp_size = tp.get("tp_size", 1)
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ConfigError(f"tensor_parallel.tp_size must be a positive integer, got {tp_size!r}")
    if tp.get("enabled", True) is False:
        tp_size = 1
    mpu = tp.get("mpu")
    if mpu is not None:  # DeepSpeed takes the model-parallel size from the mpu
        mpu_size = mpu.get_model_parallel_world_size()
        if "tp_size" in tp and tp_size != mpu_size:
            raise ConfigError(f"tensor_parallel.tp_size={tp_size} but the mpu's model-parallel size is {mpu_size}")
        tp_size = mpu_size

    dtype = parse_dtype(merged.get("dtype", torch.float16))
    max_out = merged.get("max_out_tokens", 1024)
    if not isinstance(max_out, int) or isinstance(max_out, bool) or max_out <= 0:
        raise ConfigError(f"max_out_tokens must be an integer greater than 0, got {max_out!r}")
    min_out = merged.get("min_out_tokens", 1)
    if not isinstance(min_out, int) or isinstance(min_out, bool) or not 0 < min_out <= max_out:
        raise ConfigError(f"min_out_tokens must be an integer in [1, max_out_tokens={max_out}], got {min_out!r}")
    inject = merged.get("replace_with_kernel_inject", False)
    if not isinstance(inject, bool):
        raise ConfigError(f"replace_with_kernel_inject must be a bool, got {inject!r}")
    return InferenceConfig(dtype=dtype, tp_size=tp_size, replace_with_kernel_inject=inject, max_out_tokens=max_out,
                           min_out_tokens=min_out, mpu=mpu, tp_group=tp.get("tp_group"), given=merged)


def _is_off(name: str, value: Any, default: Any) -> bool:
    """Whether a field the runtime cannot honour is left off: its default, or for the sub-config
    fields None / {} / False / enabled=False (and ZeRO stage 0)."""
    if value == default:
        return True
    if isinstance(default, dict):
        if value is None or value is False or value == {}:
            return True
        if isinstance(value, dict) and value.get("enabled") is False:
            return True
        if name == "zero" and isinstance(value, dict) and value.get("stage", 0) in (0, None):
            return True
    return False


# ----------------------------------------------------------------------------- initialize()'s config
TRAINING_SECTIONS = ("optimizer", "scheduler")


def engine_dtype(config: dict) -> torch.dtype | None:
    """The model dtype a DeepSpeed engine config asks for: fp16 / bf16 sections, else None (keep)."""
    def enabled(section: str) -> bool:
        value = config.get(section)
        return isinstance(value, dict) and bool(value.get("enabled", False))

    fp16, bf16 = enabled("fp16"), enabled("bf16") or enabled("bfloat16")
    if fp16 and bf16:
        raise DeepSpeedAssertionError("bfloat16 and fp16 modes cannot be simultaneously enabled")
    if fp16:
        return torch.float16
    if bf16:
        return torch.bfloat16
    return None


def check_engine_config(config: dict) -> None:
    """Refuse what an inference-only engine cannot do (training sections, ZeRO, tensor parallel)."""
    for section in TRAINING_SECTIONS:
        if config.get(section):
            raise TrainingNotSupportedError(
                f"the DeepSpeed config has an {section!r} section: glmrt's Sunway shim is inference-only and "
                f"never trains. Drop {section!r}, or use init_inference()")
    zero = config.get("zero_optimization") or {}
    if isinstance(zero, dict) and zero.get("stage", 0) not in (0, None):
        raise ConfigError(f"zero_optimization.stage={zero['stage']}: ZeRO is not supported by glmrt's Sunway shim")
    autotp = (config.get("tensor_parallel") or {}).get("autotp_size", 0) or 0
    if autotp > 1:
        raise ConfigError(f"tensor_parallel.autotp_size={autotp}: initialize() wraps an inference engine of one "
                          "rank; for tensor parallelism use init_inference(model, tensor_parallel={'tp_size': N})")
