"""The engines the shim's initialize() and init_inference() return, around a glmrt Model.

A model given to the shim is a glmrt Model (re-lowered onto the sunway backend if it lives on
another backend, or in another dtype) or what glmrt.load takes: a checkpoint directory or
"synthetic:<preset>". A torch.nn.Module is refused: the shim runs glmrt's GLM graph, not
DeepSpeed's module injection.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Sequence

import torch

from ....errors import ConfigError, InputError
from ....graph import build_graph
from ....lowering import lower
from ....model import Model
from ....quant import parse_format, quantize_graph, quantize_weights
from .config import InferenceConfig, TrainingNotSupportedError

BACKEND = "sunway"


def _graph_quantization(model: Model) -> tuple[int, int] | None:
    for node in model.graph.nodes:
        quant = node.attrs.get("quant")
        if quant is not None:
            return quant["bits"], quant["group_size"]
    return None


def relower(model: Model, dtype: torch.dtype | None = None, quantize: str | None = None,
            strict: bool = False) -> Model:
    """``model`` on the sunway backend in ``dtype`` (None keeps the model's), quantized to
    ``quantize`` if it is not quantized yet. Returns ``model`` itself when nothing changes."""
    from ... import require_available
    backend = require_available(BACKEND)
    dtype = dtype or model.dtype
    have = _graph_quantization(model)
    want = parse_format(quantize)
    if want is not None and have is not None and want != have:
        raise ConfigError(f"the model is already quantized (int{have[0]}, group {have[1]}); it cannot be "
                          f"re-quantized to {quantize}: load it from its float checkpoint instead")
    unchanged = model.backend.name == BACKEND and dtype == model.dtype and (want is None or want == have)
    if unchanged and not (strict and model.plan.fallbacks()):
        return model
    graph = build_graph(model.config, dtype)
    if have is not None:
        graph = quantize_graph(graph, *have)
    device = backend.device()
    # Float tensors take the new dtype; quantized weights (int8) stay as they are.
    weights = {name: model.weights[name].to(device=device, dtype=spec.dtype if spec.dtype.is_floating_point else None)
               for name, spec in graph.params.items()}
    if want is not None and have is None:
        quantized = quantize_graph(graph, *want)
        weights = quantize_weights(graph, quantized, weights)
        graph = quantized
    plan = lower(graph, backend, weights, strict=strict)
    out = Model(model.config, graph, plan, weights, model.source)
    out.tokenizer, out.chat_family = model.tokenizer, model.chat_family
    return out


def resolve_model(model: Any, dtype: torch.dtype | None, quantize: str | None, strict: bool) -> Model:
    """A glmrt Model on the sunway backend from what the caller passed as ``model``."""
    if isinstance(model, Model):
        return relower(model, dtype, quantize, strict)
    if isinstance(model, (str, os.PathLike)):
        from ....api import load
        return load(model, backend=BACKEND, dtype=dtype, quantize=quantize, strict=strict, progress=False)
    if isinstance(model, torch.nn.Module):
        raise ConfigError(f"the Sunway shim runs glmrt models, not a torch.nn.Module ({type(model).__name__}): pass "
                          "a glmrt Model (glmrt.load(...)), a checkpoint directory or 'synthetic:<preset>'")
    raise ConfigError(f"model must be a glmrt Model, a checkpoint directory or 'synthetic:<preset>', got "
                      f"{type(model).__name__}")


class GLMEngine:
    """What both engines share: the wrapped glmrt Model as ``module``, forward and generate."""

    def __init__(self, module: Model, max_out_tokens: int | None = None):
        self.module = module
        self.max_out_tokens = max_out_tokens

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    @property
    def device(self) -> torch.device:
        return self.module.device

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits (B, T, vocab), float32, of a full forward without a cache."""
        return self.module.logits(input_ids, attention_mask=attention_mask)

    __call__ = forward

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int | None = None,
                 max_length: int | None = None, num_beams: int = 1, **sampling: Any) -> torch.Tensor:
        """Prompt + new tokens, (B, T + n), like transformers' generate. Sampling options are
        Model.generate's (do_sample, temperature, top_k, top_p, repetition_penalty, seed,
        eos_token_id, pad_token_id). ``max_length`` counts the prompt, as in transformers."""
        if num_beams != 1:
            raise NotImplementedError(f"num_beams={num_beams}: beam search is not supported (DeepSpeed's injected "
                                      "kernels refuse it too); use greedy or sampled decoding")
        ids = torch.as_tensor(input_ids) if not isinstance(input_ids, torch.Tensor) else input_ids
        prompt_len = ids.shape[-1]
        if max_new_tokens is None and max_length is not None:
            max_new_tokens = max_length - prompt_len
            if max_new_tokens < 0:
                raise InputError(f"max_length={max_length} is shorter than the prompt ({prompt_len} tokens)")
        if max_new_tokens is None:
            max_new_tokens = inspect.signature(Model.generate).parameters["max_new_tokens"].default
        if self.max_out_tokens is not None and prompt_len + max_new_tokens > self.max_out_tokens:
            raise InputError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_out_tokens={self.max_out_tokens}: raise max_out_tokens in init_inference()")
        return self.module.generate(input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                                    **sampling)

    def eval(self) -> "GLMEngine":
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.module!r})"


class InferenceEngine(GLMEngine):
    """What init_inference returns (DeepSpeed's deepspeed.InferenceEngine)."""

    def __init__(self, module: Model, config: InferenceConfig, tp_group: Any = None):
        super().__init__(module, max_out_tokens=config.max_out_tokens)
        self._config = config
        self.mp_world_size = config.tp_size
        self.mpu = config.mpu
        self.tp_group = tp_group  # tensor_parallel.TPGroup when tp_size > 1

    @property
    def config(self) -> InferenceConfig:
        return self._config


class DeepSpeedEngine(GLMEngine):
    """What initialize returns as its engine: DeepSpeed's training engine interface, inference only.

    forward / __call__ / generate / eval work; anything that trains (train(True), backward,
    step, zero_grad, checkpoints of optimizer state) raises TrainingNotSupportedError."""

    def __init__(self, module: Model, config: dict, mpu: Any = None):
        super().__init__(module)
        self._config = config
        self.mpu = mpu
        self.optimizer = None
        self.lr_scheduler = None
        self.training_dataloader = None
        self.training = False
        from . import comm
        self.global_rank = comm.get_rank() if comm.is_initialized() else 0
        self.world_size = comm.get_world_size() if comm.is_initialized() else 1
        self.mp_world_size = mpu.get_model_parallel_world_size() if mpu is not None else 1
        self.dp_world_size = self.world_size // self.mp_world_size

    @property
    def config(self) -> dict:
        return self._config

    def train(self, mode: bool = True) -> "DeepSpeedEngine":
        if mode:
            raise self._no_training("train()")
        return self

    def _no_training(self, what: str) -> TrainingNotSupportedError:
        return TrainingNotSupportedError(f"{what}: glmrt's Sunway shim is an inference runtime and never trains; "
                                         "use forward() / generate()")

    def backward(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        raise self._no_training("backward()")

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise self._no_training("step()")

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        raise self._no_training("zero_grad()")

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        raise self._no_training("save_checkpoint()")

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        raise TrainingNotSupportedError("load_checkpoint(): DeepSpeed checkpoints are not read; pass the checkpoint "
                                        "directory as initialize(model=...)")


__all__: Sequence[str] = ("GLMEngine", "InferenceEngine", "DeepSpeedEngine", "relower", "resolve_model")
