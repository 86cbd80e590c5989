"""NaN / Inf weights, and float32 values that overflow the dtype they are loaded in, are refused
at load with the checkpoint tensor's name (they used to load silently and then generate token 0
forever). Integer tensors where the model needs float weights are refused too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import ckpt_writers as cw  # noqa: E402

import glmrt  # noqa: E402
from glmrt.errors import CheckpointError  # noqa: E402

BAD = "model.layers.1.mlp.down_proj.weight"


def write(path: Path, changes: dict, fmt="safetensors") -> Path:
    """A tiny transformers-format glm checkpoint; ``changes``: tensor name -> function of the tensor."""
    cfg = cw.hf_glm_config(num_hidden_layers=2, max_position_embeddings=16)
    sd = cw.random_hf_glm_state_dict(cfg, seed=0)
    for name, fn in changes.items():
        sd[name] = fn(sd[name])
    return cw.write_hf_checkpoint(path, cfg, sd, fmt=fmt)


def poke(value):
    def change(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    return change


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), "infinite"),
                                        (float("-inf"), "infinite")])
def test_nonfinite_weights_are_refused_with_the_tensor_name(tmp_path, fmt, value, what):
    path = write(tmp_path, {BAD: poke(value)}, fmt)
    with pytest.raises(CheckpointError, match=rf"{BAD}.*{what}"):
        glmrt.load(path, dtype="float32", progress=False)


def test_float32_values_beyond_float16_are_refused_in_float16_only(tmp_path):
    path = write(tmp_path, {BAD: poke(1.0e5)})
    with pytest.raises(CheckpointError, match=rf"{BAD}.*1e\+05.*float16.*bfloat16"):
        glmrt.load(path, dtype="float16", progress=False)
    for dtype in ("float32", "bfloat16"):  # representable there: loads
        model = glmrt.load(path, dtype=dtype, progress=False)
        assert torch.isfinite(model.logits([[5, 6, 7]])).all()


def test_nonfinite_weights_are_refused_before_quantizing_on_load(tmp_path):
    path = write(tmp_path, {BAD: poke(float("nan"))})
    with pytest.raises(CheckpointError, match=BAD):
        glmrt.load(path, dtype="float32", quantize="int8", progress=False)


def test_a_nan_in_a_fused_source_names_that_source(tmp_path):
    """q/k/v projections are concatenated into one parameter at load: the error names k_proj."""
    name = "model.layers.0.self_attn.k_proj.bias"
    path = write(tmp_path, {name: poke(float("nan"))})
    with pytest.raises(CheckpointError, match=rf"tensor {name} .*NaN"):
        glmrt.load(path, dtype="float32", progress=False)
