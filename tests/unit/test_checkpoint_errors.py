"""Bad checkpoints, configs and inputs: glmrt must raise its own exception class, at load time,
with a message that names the problem (the file, the tensor and shapes, the model_type, ...).

Pure Python: the tiny checkpoints are written by tests/models/ckpt_writers.py (torch +
safetensors only; no transformers needed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import ckpt_writers as cw  # noqa: E402

import glmrt  # noqa: E402
from glmrt.errors import (BackendError, CheckpointError, ConfigError, InputError,  # noqa: E402
                          UnsupportedModelError)

MAX_POS = 16


def _config(**overrides) -> dict:
    cfg = cw.hf_glm_config(num_hidden_layers=2, max_position_embeddings=MAX_POS)
    cfg.update(overrides)
    return cfg


def _state_dict(cfg=None) -> dict[str, torch.Tensor]:
    return cw.random_hf_glm_state_dict(cfg or _config(), seed=0)


def _write(path: Path, cfg=None, sd=None, fmt="safetensors", num_shards=1) -> Path:
    cfg = cfg or _config()
    return cw.write_hf_checkpoint(path, cfg, sd if sd is not None else _state_dict(cfg), fmt=fmt,
                                  num_shards=num_shards)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("good"))


@pytest.fixture
def copy_of_good(good_dir, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(good_dir, dst)
    return dst


def _load(path, **kw):
    kw.setdefault("dtype", "float32")
    return glmrt.load(str(path), **kw)


def _mentions_shape(msg: str, shape) -> bool:
    dims = [int(d) for d in shape]
    sep = r"\s*,\s*"
    body = sep.join(str(d) for d in dims)
    patterns = [r"\(" + body + r",?\)", r"\[" + body + r"\]", r"\b" + "x".join(map(str, dims)) + r"\b",
                r"\b" + r"\s*×\s*".join(map(str, dims)) + r"\b"]
    return any(re.search(p, msg) for p in patterns)


# ------------------------------------------------------------------------------------------------
# the good checkpoint loads (otherwise every test below could pass for the wrong reason)


def test_good_checkpoint_loads(good_dir):
    m = _load(good_dir)
    ids = torch.arange(10, 10 + MAX_POS).unsqueeze(0)  # exactly max positions: allowed
    out = m.logits(ids)
    assert out.shape == (1, MAX_POS, 256) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("fmt,num_shards", [("safetensors", 2), ("bin", 1), ("bin", 2)])
def test_good_checkpoint_other_layouts_load_the_same(good_dir, tmp_path, fmt, num_shards):
    d = _write(tmp_path / "ckpt", fmt=fmt, num_shards=num_shards)
    ids = torch.arange(20, 30).unsqueeze(0)
    assert torch.equal(_load(d).logits(ids), _load(good_dir).logits(ids))


# ------------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("keep", ["half", "header-only-part"])
def test_truncated_safetensors(copy_of_good, keep):
    f = copy_of_good / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if keep == "half" else data[:20])
    with pytest.raises(CheckpointError) as e:
        _load(copy_of_good)
    assert "model.safetensors" in str(e.value)


def test_truncated_safetensors_shard_names_the_shard(tmp_path):
    d = _write(tmp_path / "ckpt", num_shards=2)
    f = d / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as e:
        _load(d)
    assert "model-00002-of-00002.safetensors" in str(e.value)


def test_garbage_bin(tmp_path):
    d = tmp_path / "ckpt"
    cw.write_config(d, _config())
    (d / "pytorch_model.bin").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as e:
        _load(d)
    assert "pytorch_model.bin" in str(e.value)


def test_truncated_bin_shard(tmp_path):
    d = _write(tmp_path / "ckpt", fmt="bin", num_shards=2)
    f = d / "pytorch_model-00001-of-00002.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        _load(d)
    assert "pytorch_model-00001-of-00002.bin" in str(e.value)


def _write_legacy_bin(d: Path, sd: dict) -> Path:
    """pytorch_model.bin in torch's legacy (pre-1.6, non-zip) serialization, as old releases ship it."""
    cw.write_config(d, _config())
    torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return d


def test_legacy_non_zip_bin_loads(good_dir, tmp_path):
    """torch.load(weights_only=True) reads the legacy format; only its mmap cannot (it once said
    "truncated or corrupt")."""
    d = _write_legacy_bin(tmp_path / "ckpt", _state_dict())
    assert (d / "pytorch_model.bin").read_bytes()[:2] != b"PK"  # not a zip archive
    ids = torch.arange(20, 30).unsqueeze(0)
    assert torch.equal(_load(d).logits(ids), _load(good_dir).logits(ids))


def test_truncated_legacy_bin_says_truncated(tmp_path):
    d = _write_legacy_bin(tmp_path / "ckpt", _state_dict())
    f = d / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        _load(d)
    assert "pytorch_model.bin" in str(e.value) and "non-zip" in str(e.value)  # names the format it read


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_refused_as_unsafe_says_so(tmp_path, legacy):
    """A pickle with more than tensors (here an argparse.Namespace, as training scripts save) is not
    corrupt: weights_only=True refuses it, and the message says why and what to do."""
    import argparse
    d = tmp_path / "ckpt"
    cw.write_config(d, _config())
    sd = dict(_state_dict(), args=argparse.Namespace(lr=1e-4))
    torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as e:
        _load(d)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "truncated" not in msg and "corrupt" not in msg
    assert "weights_only" in msg and "argparse.Namespace" in msg and "safetensors" in msg


def test_missing_config_json(copy_of_good):
    (copy_of_good / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        _load(copy_of_good)
    assert "config.json" in str(e.value)


def test_missing_weights(tmp_path):
    d = tmp_path / "ckpt"
    cw.write_config(d, _config())
    with pytest.raises(CheckpointError) as e:
        _load(d)
    msg = str(e.value)
    # names the directory, says there are no weights and which files it looked for
    assert str(d) in msg and "no weights" in msg, msg
    assert all(name in msg for name in ("model.safetensors", "pytorch_model.bin")), msg


def test_nonexistent_directory(tmp_path):
    # Not pinned by the API spec beyond "a glmrt error naming the path" (it may be read as an
    # unknown preset name rather than a broken checkpoint).
    with pytest.raises((CheckpointError, ConfigError)) as e:
        _load(tmp_path / "no_such_dir")
    assert "no_such_dir" in str(e.value)


@pytest.mark.parametrize("fmt,missing", [("safetensors", "model-00002-of-00002.safetensors"),
                                         ("bin", "pytorch_model-00002-of-00002.bin")])
def test_index_points_at_missing_shard(tmp_path, fmt, missing):
    d = _write(tmp_path / "ckpt", fmt=fmt, num_shards=2)
    (d / missing).unlink()
    with pytest.raises(CheckpointError) as e:
        _load(d)
    assert missing in str(e.value)


def test_index_names_a_shard_that_was_never_written(copy_of_good):
    """An index whose weight_map sends a tensor to a file that does not exist."""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(copy_of_good / "model.safetensors"))
    (copy_of_good / "model.safetensors").unlink()
    save_file(sd, str(copy_of_good / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in sd}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (copy_of_good / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError) as e:
        _load(copy_of_good)
    assert "model-00002-of-00002.safetensors" in str(e.value)


# ------------------------------------------------------------------------------------------------
# tensors


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.bias",
                                  "lm_head.weight", "model.norm.weight"])
def test_missing_tensor(tmp_path, name):
    sd = _state_dict()
    del sd[name]
    d = _write(tmp_path / "ckpt", sd=sd)
    with pytest.raises(CheckpointError) as e:
        _load(d)
    assert name in str(e.value)


@pytest.mark.parametrize("name,shape", [("model.layers.0.mlp.extra_proj.weight", (8, 64)),
                                        ("model.layers.2.input_layernorm.weight", (64,))])
def test_unexpected_extra_tensor(tmp_path, name, shape):
    sd = _state_dict()
    sd[name] = torch.ones(shape)
    d = _write(tmp_path / "ckpt", sd=sd)
    with pytest.raises(CheckpointError) as e:
        _load(d)
    assert name in str(e.value)


@pytest.mark.parametrize("name,expected,found", [
    ("model.layers.0.self_attn.q_proj.weight", (64, 64), (80, 64)),
    ("model.layers.1.self_attn.q_proj.bias", (64,), (80,)),
    ("model.layers.0.self_attn.k_proj.weight", (32, 64), (48, 64)),
    ("model.layers.1.self_attn.o_proj.weight", (64, 64), (64, 48)),
    ("model.embed_tokens.weight", (256, 64), (300, 64)),
])
def test_misshaped_tensor(tmp_path, name, expected, found):
    """The message names the checkpoint's tensor, the shape found and the shape that tensor should
    have (not only the shape of some fused tensor built from it)."""
    sd = _state_dict()
    assert tuple(sd[name].shape) == expected
    sd[name] = torch.zeros(found)
    d = _write(tmp_path / "ckpt", sd=sd)
    with pytest.raises(CheckpointError) as e:
        _load(d)
    msg = str(e.value)
    assert name in msg
    assert _mentions_shape(msg, found), f"found shape {found} not in: {msg}"
    assert _mentions_shape(msg, expected), f"expected shape {expected} of {name} not in: {msg}"


def test_misshaped_tensor_in_bin(tmp_path):
    name = "model.layers.1.mlp.gate_up_proj.weight"
    sd = _state_dict()
    assert tuple(sd[name].shape) == (192, 64)
    sd[name] = torch.zeros(96, 64)
    d = _write(tmp_path / "ckpt", sd=sd, fmt="bin")
    with pytest.raises(CheckpointError) as e:
        _load(d)
    msg = str(e.value)
    assert name in msg and _mentions_shape(msg, (192, 64)) and _mentions_shape(msg, (96, 64)), msg


def test_config_hidden_size_contradicts_weights(tmp_path):
    sd = _state_dict()                      # weights for hidden_size 64
    d = _write(tmp_path / "ckpt", cfg=_config(hidden_size=80), sd=sd)
    with pytest.raises(CheckpointError) as e:
        _load(d)
    msg = str(e.value)
    assert "hidden_size" in msg or (re.search(r"\b64\b", msg) and re.search(r"\b80\b", msg)), msg


def test_config_num_layers_contradicts_weights(tmp_path):
    """Weights for 2 layers, config says 3: layer 2's tensors are missing."""
    d = _write(tmp_path / "ckpt", cfg=_config(num_hidden_layers=3), sd=_state_dict())
    with pytest.raises(CheckpointError) as e:
        _load(d)
    assert "model.layers.2." in str(e.value) or "num_hidden_layers" in str(e.value)


def test_thudm_missing_qkv_bias(tmp_path):
    cfg = _config()
    thudm = cw.hf_to_thudm(_state_dict(cfg), cfg, rope_ratio=2.5)
    name = "transformer.encoder.layers.1.self_attention.query_key_value.bias"
    del thudm[name]
    d = tmp_path / "ckpt"
    tcfg = cw.thudm_config_from_hf(cfg, rope_ratio=2.5)
    cw.write_config(d, tcfg)
    cw.write_safetensors(d, thudm)
    with pytest.raises(CheckpointError) as e:
        _load(d)
    assert name in str(e.value)


def test_thudm_misshaped_qkv(tmp_path):
    cfg = _config()
    thudm = cw.hf_to_thudm(_state_dict(cfg), cfg, rope_ratio=2.5)
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    assert tuple(thudm[name].shape) == (128, 64)
    thudm[name] = torch.zeros(192, 64)       # as if 4 KV groups instead of 2
    d = tmp_path / "ckpt"
    cw.write_config(d, cw.thudm_config_from_hf(cfg, rope_ratio=2.5))
    cw.write_torch_bin(d, thudm, num_shards=2)
    with pytest.raises(CheckpointError) as e:
        _load(d)
    msg = str(e.value)
    assert name in msg and _mentions_shape(msg, (128, 64)) and _mentions_shape(msg, (192, 64)), msg


# ------------------------------------------------------------------------------------------------
# config, backend, dtype


def test_unknown_model_type(tmp_path):
    d = _write(tmp_path / "ckpt", cfg=_config(model_type="foo"))
    with pytest.raises(UnsupportedModelError) as e:
        _load(d)
    assert isinstance(e.value, ConfigError)
    assert "foo" in str(e.value)


def test_unknown_backend(good_dir):
    with pytest.raises(BackendError) as e:
        _load(good_dir, backend="warpdrive9000")
    assert "warpdrive9000" in str(e.value)


def test_unknown_dtype_name(good_dir):
    with pytest.raises(ConfigError) as e:
        _load(good_dir, dtype="int3")
    assert "int3" in str(e.value)


# ------------------------------------------------------------------------------------------------
# inputs


def test_prompt_longer_than_max_positions(good_dir):
    m = _load(good_dir)
    ids = torch.arange(10, 10 + MAX_POS + 1).unsqueeze(0)
    with pytest.raises(InputError) as e:
        m.logits(ids)
    assert str(MAX_POS) in str(e.value) or str(MAX_POS + 1) in str(e.value), str(e.value)
    with pytest.raises(InputError):
        m.generate(ids, 1)
    with pytest.raises(InputError):
        next(iter(m.stream(ids, 1)))


def test_prompt_longer_than_thudm_seq_length(tmp_path):
    cfg = _config()
    d = tmp_path / "ckpt"
    cw.write_config(d, cw.thudm_config_from_hf(cfg, rope_ratio=2.5, seq_length=12))
    cw.write_safetensors(d, cw.hf_to_thudm(_state_dict(cfg), cfg, rope_ratio=2.5))
    m = _load(d)
    assert m.logits(torch.arange(10, 22).unsqueeze(0)).shape == (1, 12, 256)
    with pytest.raises(InputError):
        m.logits(torch.arange(10, 23).unsqueeze(0))


def test_bad_input_shape(good_dir):
    m = _load(good_dir)
    with pytest.raises(InputError):
        m.logits(torch.arange(10, 18).view(1, 2, 4))          # 3-D input_ids
    with pytest.raises(InputError):
        m.logits(torch.arange(10, 18).view(1, 8), attention_mask=torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(InputError):
        m.generate(torch.arange(10, 18).view(1, 2, 4), 2)
