"""A swDeepSpeed-compatible shim: DeepSpeed's public inference API over glmrt's sunway backend.

swDeepSpeed, the DeepSpeed port for Sunway that GLM-130B was trained with, has no public API; its
code follows DeepSpeed's. This module mirrors DeepSpeed 0.19's public entry points, so code written
as ``import swDeepSpeed as deepspeed`` runs on glmrt with

    from glmrt.backends.sunway import swdeepspeed as deepspeed

    engine = deepspeed.init_inference("synthetic:chatglm3-6b", tensor_parallel={"tp_size": 1},
                                      dtype=torch.half, max_out_tokens=512)
    # tp_size N > 1: start N processes (torchrun / a launcher setting RANK, WORLD_SIZE, MASTER_*);
    # each holds 1/N of the heads and MLP width (tensor_parallel.py)
    out = engine.generate(input_ids, max_new_tokens=16)

    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(
        model=glmrt_model, config={"fp16": {"enabled": True}})   # optimizer etc. are None

Signatures are DeepSpeed's (see ACCELERATORS.md); so are the config rules (conflicting
duplicates raise, see config.py). It is an inference runtime: ``initialize`` refuses optimizers,
schedulers, training data and training configs with TrainingNotSupportedError. Models are glmrt
models (a glmrt Model, a checkpoint directory or "synthetic:<preset>"), not torch modules.
Collectives (``comm``) go to a real swDeepSpeed when one is importable, else to torch.distributed
over gloo.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Optional, Tuple, Union

from . import comm, tensor_parallel
from .comm import TORCH_DISTRIBUTED_DEFAULT_PORT, init_distributed
from .config import (INFERENCE_FIELDS, DeepSpeedAssertionError, InferenceConfig, TrainingNotSupportedError,
                     check_engine_config, engine_dtype, load_config, parse_inference_config)
from .engine import DeepSpeedEngine, GLMEngine, InferenceEngine, resolve_model

# The DeepSpeed release whose public API this mirrors, marked as glmrt's shim.
__version__ = "0.19.8+glmrt.sunway.shim"
IS_GLMRT_SHIM = True


def initialize(args: Any = None,
               model: Any = None,
               optimizer: Optional[Any] = None,
               model_parameters: Optional[Any] = None,
               training_data: Optional[Any] = None,
               lr_scheduler: Optional[Any] = None,
               distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT,
               mpu: Any = None,
               dist_init_required: Optional[bool] = None,
               collate_fn: Optional[Callable] = None,
               config: Optional[Union[str, Dict[str, Any]]] = None,
               mesh_param: Any = None,
               config_params: Optional[Union[str, Dict[str, Any]]] = None) -> Tuple[DeepSpeedEngine, None, None, None]:
    """DeepSpeed's ``initialize``, inference only: returns ``(engine, None, None, None)`` in
    DeepSpeed's order (engine, optimizer, training_dataloader, lr_scheduler).

    As in DeepSpeed: ``model`` is required; the config comes from ``config``, else
    ``config_params``, else ``args.deepspeed_config`` (giving it twice is an error), and is a dict or
    a JSON file; the process group is initialised with ``init_distributed(distributed_port=...,
    dist_init_required=...)``. The config's ``fp16`` / ``bf16`` sections set the model dtype
    (neither keeps the model's). Anything that trains is refused: ``optimizer``,
    ``model_parameters``, ``training_data``, ``lr_scheduler``, ``collate_fn``, and ``optimizer`` /
    ``scheduler`` sections in the config. ``mpu`` must report a model-parallel size of 1 (tensor parallelism is init_inference's)
    and ``mesh_param`` must be None."""
    if model is None:
        raise DeepSpeedAssertionError("deepspeed.initialize requires a model")
    training = {"optimizer": optimizer, "model_parameters": model_parameters, "training_data": training_data,
                "lr_scheduler": lr_scheduler, "collate_fn": collate_fn}
    given = [name for name, value in training.items() if value is not None]
    if given:
        raise TrainingNotSupportedError(
            f"initialize({', '.join(f'{n}=...' for n in given)}): glmrt's Sunway shim is inference-only and never "
            "trains; call initialize(model=..., config=...) without them, or init_inference()")
    if mesh_param is not None:
        raise DeepSpeedAssertionError("mesh_param: data / sequence parallel meshes are not supported by glmrt's "
                                      "Sunway shim")
    if mpu is not None and mpu.get_model_parallel_world_size() != 1:
        raise DeepSpeedAssertionError(f"mpu reports model parallel size {mpu.get_model_parallel_world_size()}: "
                                      "initialize() runs one rank's whole model; for tensor parallelism use "
                                      "init_inference(model, mpu=mpu) or tensor_parallel={'tp_size': N}")

    comm.init_distributed(dist_backend=None, distributed_port=distributed_port,
                          dist_init_required=dist_init_required)

    if config is None and config_params is not None:
        config = config_params
    if getattr(args, "deepscale_config", None) is not None:
        if getattr(args, "deepspeed_config", None) is not None:
            raise DeepSpeedAssertionError("Not sure how to proceed, we were given both a deepscale_config and "
                                          "deepspeed_config")
        args.deepspeed_config, args.deepscale_config = args.deepscale_config, None
    if getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise DeepSpeedAssertionError("Not sure how to proceed, we were given deepspeed configs in the deepspeed "
                                          "arguments and deepspeed.initialize() function call")
        config = args.deepspeed_config
    if config is None:
        raise DeepSpeedAssertionError("DeepSpeed requires --deepspeed_config to specify configuration file")
    config = load_config(config)
    check_engine_config(config)

    module = resolve_model(model, engine_dtype(config), quantize=None, strict=False)
    engine = DeepSpeedEngine(module, config, mpu=mpu)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def init_inference(model: Any, config: Optional[Union[str, Dict[str, Any]]] = None, **kwargs: Any) -> InferenceEngine:
    """DeepSpeed's ``init_inference``: the config dict (or JSON path) and keyword arguments are
    merged as DeepSpeed merges them (a key in both with different values raises) and read by
    DeepSpeed's rules (see config.py): ``tensor_parallel={"tp_size": N}`` (``mp_size`` is the
    deprecated alias; both together raise; N > 1 splits the model over N ranks of the process group,
    see tensor_parallel.py, each rank running init_inference with the same arguments), ``dtype`` (default fp16; torch.int8 = int8 weight-only
    quantization), ``replace_with_kernel_inject`` / ``kernel_inject`` (default False; True lowers
    strictly, so every op must run a backend kernel), ``max_out_tokens`` (prompt + new tokens,
    default 1024). ``model`` is a glmrt Model, a checkpoint directory or "synthetic:<preset>"."""
    cfg = parse_inference_config(config, **kwargs)
    if cfg.tp_size == 1:
        module = resolve_model(model, cfg.compute_dtype, quantize=cfg.quantize, strict=cfg.replace_with_kernel_inject)
        return InferenceEngine(module, cfg)
    group = tensor_parallel.make_group(cfg.tp_size, cfg.mpu, cfg.tp_group)
    full = resolve_model(model, cfg.compute_dtype, quantize=None, strict=False)
    tensor_parallel.check_divisible(full.config, cfg.tp_size)
    module = tensor_parallel.shard_model(full, group, cfg.quantize, strict=cfg.replace_with_kernel_inject)
    del full
    return InferenceEngine(module, cfg, group)


def default_inference_config() -> Dict[str, Any]:
    """DeepSpeed's inference config defaults, by field name."""
    return {name: spec.default for name, spec in INFERENCE_FIELDS.items()}


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeepSpeed's --deepspeed / --deepspeed_config flags (and the deprecated --deepscale ones)."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true",
                       help="Deprecated enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)")
    group.add_argument("--deepscale_config", default=None, type=str,
                       help="Deprecated DeepSpeed json configuration file.")
    return parser


__all__ = [
    "initialize", "init_inference", "init_distributed", "comm", "default_inference_config", "add_config_arguments",
    "InferenceEngine", "DeepSpeedEngine", "GLMEngine", "InferenceConfig", "DeepSpeedAssertionError",
    "TrainingNotSupportedError", "__version__",
]
