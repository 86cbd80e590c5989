"""Write tiny GLM checkpoints in the exact released layouts, for tests.

Nothing here imports glmrt: these writers are the independent side of the parity and error tests.
The checkpoint writers need only torch, safetensors and json, so tests/unit can use them without
the transformers package; the tiny transformers reference models at the end of this file import
transformers when they are built.

Layouts written:
- transformers `glm` / `glm4` names (`model.layers.N.self_attn.q_proj.weight`, ...), with a
  config.json in the released GLM-4-0414 style (top-level `rope_theta`, `partial_rotary_factor`);
- THUDM ChatGLM2/3 and GLM-4-9B names (`transformer.encoder.layers.N.self_attention.query_key_value.weight`,
  ...), with a THUDM `config.json` (`model_type: "chatglm"`);
- as one `model.safetensors`, as `model-0000X-of-0000N.safetensors` + `model.safetensors.index.json`,
  as one `pytorch_model.bin`, or as `pytorch_model-0000X-of-0000N.bin` + `pytorch_model.bin.index.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

# --------------------------------------------------------------------------------------------------
# configs


def hf_glm_config(*, model_type: str = "glm", vocab_size: int = 256, hidden_size: int = 64,
                  intermediate_size: int = 96, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                  num_key_value_heads: int = 2, head_dim: int = 16, partial_rotary_factor: float = 0.5,
                  rope_theta: float = 25000.0, rms_norm_eps: float = 1e-5, max_position_embeddings: int = 64,
                  attention_bias: bool = True, eos_token_id=(2, 3), pad_token_id: int = 0,
                  torch_dtype: str = "float32") -> dict:
    """A config.json for a transformers-format `glm` or `glm4` checkpoint, shaped like the released
    GLM-4-9B-0414 / glm-4-9b-chat-hf files (top-level `rope_theta` and `partial_rotary_factor`)."""
    arch = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}.get(model_type, "GlmForCausalLM")
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": attention_bias,
        "attention_dropout": 0.0,
        "partial_rotary_factor": partial_rotary_factor,
        "rope_theta": rope_theta,
        "rms_norm_eps": rms_norm_eps,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "eos_token_id": list(eos_token_id),
        "pad_token_id": pad_token_id,
        "torch_dtype": torch_dtype,
    }


def thudm_config_from_hf(hf: Mapping, *, rope_ratio: float, seq_length: int | None = None,
                         torch_dtype: str = "float32") -> dict:
    """The THUDM (`model_type: "chatglm"`) config.json of the same model as the transformers config
    `hf` (a dict, e.g. `GlmConfig.to_dict()`). The caller must have built the HF model with
    rope_theta == 10000 * rope_ratio, since THUDM code uses base = 10000 * rope_ratio."""
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    prf = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    assert theta is not None and abs(theta - 10000.0 * rope_ratio) < 1e-6 * theta, (theta, rope_ratio)
    # THUDM code always rotates half of kv_channels: it has no partial_rotary_factor field
    assert prf == 0.5, prf
    assert not hf.get("tie_word_embeddings", False)
    eos = hf["eos_token_id"]
    return {
        "_name_or_path": "THUDM/glm-4-9b-chat",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "add_bias_linear": False,
        "add_qkv_bias": bool(hf.get("attention_bias", True)),
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "classifier_dropout": None,
        "ffn_hidden_size": hf["intermediate_size"],
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": hf["hidden_size"],
        "kv_channels": hf["head_dim"],
        "layernorm_epsilon": hf["rms_norm_eps"],
        "multi_query_attention": True,
        "multi_query_group_num": hf["num_key_value_heads"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_layers": hf["num_hidden_layers"],
        "original_rope": True,
        "padded_vocab_size": hf["vocab_size"],
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": rope_ratio,
        "seq_length": seq_length if seq_length is not None else hf["max_position_embeddings"],
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "tie_word_embeddings": False,
        "eos_token_id": list(eos) if isinstance(eos, (list, tuple)) else eos,
        "pad_token_id": hf["pad_token_id"],
    }


def write_config(path: str | Path, config: Mapping) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path / "config.json"


# --------------------------------------------------------------------------------------------------
# state dicts


def hf_glm_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers `glm`/`glm4` checkpoint and its shape, from a config dict."""
    h, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (nh * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (nkv * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (nkv * hd, h)
        if config.get("attention_bias", True):
            shapes[p + "self_attn.q_proj.bias"] = (nh * hd,)
            shapes[p + "self_attn.k_proj.bias"] = (nkv * hd,)
            shapes[p + "self_attn.v_proj.bias"] = (nkv * hd,)
        shapes[p + "self_attn.o_proj.weight"] = (h, nh * hd)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if config["model_type"] == "glm4":
            shapes[p + "post_self_attn_layernorm.weight"] = (h,)
            shapes[p + "post_mlp_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def random_hf_glm_state_dict(config: Mapping, seed: int = 0, dtype: torch.dtype = torch.float32
                             ) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes of a transformers `glm`/`glm4` checkpoint. Norm
    weights are around 1 (not all ones), biases are non-zero."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in hf_glm_shapes(config).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        sd[name] = t.to(dtype).contiguous()
    return sd


def hf_to_thudm(sd: Mapping[str, torch.Tensor], config: Mapping, *, rope_ratio: float = 1.0,
                with_inv_freq: bool = True) -> dict[str, torch.Tensor]:
    """Rename a transformers `glm` state dict (`config`: its config as a dict) to THUDM ChatGLM2/3, GLM-4-9B names: q/k/v are
    concatenated on rows into `query_key_value` (not interleaved), gate_up_proj is dense_h_to_4h.
    Adds `transformer.rotary_pos_emb.inv_freq` (which loaders must ignore) when asked."""
    out: dict[str, torch.Tensor] = {}
    out["transformer.embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"]
    for i in range(config["num_hidden_layers"]):
        s, d = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        if (s + "post_self_attn_layernorm.weight") in sd:
            raise ValueError("glm4 sandwich norms have no THUDM ChatGLM equivalent")
        out[d + "input_layernorm.weight"] = sd[s + "input_layernorm.weight"]
        out[d + "self_attention.query_key_value.weight"] = torch.cat(
            [sd[s + "self_attn.q_proj.weight"], sd[s + "self_attn.k_proj.weight"],
             sd[s + "self_attn.v_proj.weight"]], dim=0).contiguous()
        if (s + "self_attn.q_proj.bias") in sd:
            out[d + "self_attention.query_key_value.bias"] = torch.cat(
                [sd[s + "self_attn.q_proj.bias"], sd[s + "self_attn.k_proj.bias"],
                 sd[s + "self_attn.v_proj.bias"]], dim=0).contiguous()
        out[d + "self_attention.dense.weight"] = sd[s + "self_attn.o_proj.weight"]
        out[d + "post_attention_layernorm.weight"] = sd[s + "post_attention_layernorm.weight"]
        out[d + "mlp.dense_h_to_4h.weight"] = sd[s + "mlp.gate_up_proj.weight"]
        out[d + "mlp.dense_4h_to_h.weight"] = sd[s + "mlp.down_proj.weight"]
    out["transformer.encoder.final_layernorm.weight"] = sd["model.norm.weight"]
    out["transformer.output_layer.weight"] = sd["lm_head.weight"]
    if with_inv_freq:
        # THUDM: RotaryEmbedding(kv_channels // 2), inv_freq = 1 / base^(arange(0, dim, 2) / dim);
        # stored in the released checkpoints in the model dtype.
        dim = config["head_dim"] // 2
        base = 10000.0 * rope_ratio
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        out["transformer.rotary_pos_emb.inv_freq"] = inv.to(sd["lm_head.weight"].dtype)
    return {k: v.contiguous().clone() for k, v in out.items()}


def thudm_to_hf(sd: Mapping[str, torch.Tensor], thudm_config: Mapping) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_thudm (used to check the writer itself)."""
    nh, nkv, hd = (thudm_config["num_attention_heads"], thudm_config["multi_query_group_num"],
                   thudm_config["kv_channels"])
    out = {"model.embed_tokens.weight": sd["transformer.embedding.word_embeddings.weight"]}
    for i in range(thudm_config["num_layers"]):
        s, d = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        out[d + "input_layernorm.weight"] = sd[s + "input_layernorm.weight"]
        q, k, v = sd[s + "self_attention.query_key_value.weight"].split([nh * hd, nkv * hd, nkv * hd], dim=0)
        out[d + "self_attn.q_proj.weight"], out[d + "self_attn.k_proj.weight"] = q, k
        out[d + "self_attn.v_proj.weight"] = v
        if (s + "self_attention.query_key_value.bias") in sd:
            qb, kb, vb = sd[s + "self_attention.query_key_value.bias"].split([nh * hd, nkv * hd, nkv * hd])
            out[d + "self_attn.q_proj.bias"], out[d + "self_attn.k_proj.bias"] = qb, kb
            out[d + "self_attn.v_proj.bias"] = vb
        out[d + "self_attn.o_proj.weight"] = sd[s + "self_attention.dense.weight"]
        out[d + "post_attention_layernorm.weight"] = sd[s + "post_attention_layernorm.weight"]
        out[d + "mlp.gate_up_proj.weight"] = sd[s + "mlp.dense_h_to_4h.weight"]
        out[d + "mlp.down_proj.weight"] = sd[s + "mlp.dense_4h_to_h.weight"]
    out["model.norm.weight"] = sd["transformer.encoder.final_layernorm.weight"]
    out["lm_head.weight"] = sd["transformer.output_layer.weight"]
    return out


# --------------------------------------------------------------------------------------------------
# weight files


def _split(names: list[str], num_shards: int) -> list[list[str]]:
    assert 1 <= num_shards <= len(names)
    per = -(-len(names) // num_shards)
    parts = [names[i * per:(i + 1) * per] for i in range(num_shards)]
    assert all(parts), "empty shard"
    return parts


def _write_index(path: Path, index_name: str, weight_map: dict[str, str], sd: Mapping[str, torch.Tensor]):
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / index_name).write_text(json.dumps(index, indent=2))


def write_safetensors(path: str | Path, sd: Mapping[str, torch.Tensor], num_shards: int = 1) -> list[Path]:
    """`model.safetensors`, or `model-0000X-of-0000N.safetensors` + `model.safetensors.index.json`.
    Returns the weight files written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in sd.items()}
    if num_shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return [path / "model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(_split(list(tensors), num_shards)):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in names}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        files.append(path / fname)
    _write_index(path, "model.safetensors.index.json", weight_map, tensors)
    return files


def write_torch_bin(path: str | Path, sd: Mapping[str, torch.Tensor], num_shards: int = 1) -> list[Path]:
    """`pytorch_model.bin`, or `pytorch_model-0000X-of-0000N.bin` + `pytorch_model.bin.index.json`
    (the ChatGLM releases' layout). Returns the weight files written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().clone() for k, v in sd.items()}
    if num_shards == 1:
        torch.save(tensors, path / "pytorch_model.bin")
        return [path / "pytorch_model.bin"]
    files, weight_map = [], {}
    for i, names in enumerate(_split(list(tensors), num_shards)):
        fname = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        torch.save({k: tensors[k] for k in names}, path / fname)
        weight_map.update({k: fname for k in names})
        files.append(path / fname)
    _write_index(path, "pytorch_model.bin.index.json", weight_map, tensors)
    return files


def read_any(path: str | Path) -> dict[str, torch.Tensor]:
    """Read back every tensor of a checkpoint directory written by the writers above."""
    from safetensors.torch import load_file
    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).exists():
            files = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [p.name for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists()]
    for fname in files:
        if fname.endswith(".safetensors"):
            out.update(load_file(str(path / fname)))
        else:
            out.update(torch.load(path / fname, weights_only=True, map_location="cpu"))
    return out


def write_hf_checkpoint(path: str | Path, config: Mapping, sd: Mapping[str, torch.Tensor], *,
                        fmt: str = "safetensors", num_shards: int = 1) -> Path:
    """config.json + weights in one call. fmt: "safetensors" or "bin"."""
    path = Path(path)
    write_config(path, config)
    if fmt == "safetensors":
        write_safetensors(path, sd, num_shards)
    elif fmt == "bin":
        write_torch_bin(path, sd, num_shards)
    else:
        raise ValueError(fmt)
    return path


# --------------------------------------------------------------------------------------------------
# tiny transformers reference models (transformers is imported only when these are used)

VOCAB = 256
PAD_ID = 1
MAX_NEW = 32
ROPE_RATIO = 2.5                    # THUDM: base = 10000 * rope_ratio
ROPE_THETA = 10000.0 * ROPE_RATIO   # transformers: rope_theta
MIN_GREEDY_MARGIN = 5e-4            # below this a greedy-parity mismatch would be a coin toss

# Prompts: token ids 10..255, never the pad id. The batch has three different lengths.
_g = torch.Generator().manual_seed(1234)
BATCH_PROMPTS = [torch.randint(10, VOCAB, (n,), generator=_g).tolist() for n in (7, 12, 4)]
del _g


def tiny_hf_kwargs(**overrides) -> dict:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
              rope_theta=ROPE_THETA, attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=128,
              pad_token_id=PAD_ID, eos_token_id=[2, 3], tie_word_embeddings=False, initializer_range=0.1)
    kw.update(overrides)
    return kw


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """A random transformers GlmForCausalLM ("glm") or Glm4ForCausalLM ("glm4"), fp32, eval mode,
    eager attention, with perturbed norm weights and non-zero q/k/v biases."""
    import transformers
    if kind == "glm":
        config_cls, model_cls = transformers.GlmConfig, transformers.GlmForCausalLM
    elif kind == "glm4":
        config_cls, model_cls = transformers.Glm4Config, transformers.Glm4ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    config = config_cls(**tiny_hf_kwargs(**overrides))
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def left_pad(prompts: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask), both LongTensor[B, T]."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    return ids, mask


def generation_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions as transformers' generate builds them for a left-padded batch."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference logits, float32 [B, T, V]. With a left-padded mask, positions count real tokens
    only (what transformers' generate does), so a row's logits do not depend on its padding."""
    if mask is None:
        return model(input_ids=ids).logits.float()
    return model(input_ids=ids, attention_mask=mask, position_ids=generation_position_ids(mask)).logits.float()


@torch.no_grad()
def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
    kw.setdefault("max_new_tokens", MAX_NEW)
    kw.setdefault("do_sample", False)
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD_ID, **kw)


@torch.no_grad()
def greedy_margins(model, ids: torch.Tensor, mask: torch.Tensor, eos) -> torch.Tensor:
    """The gap between the best and second-best logit at every greedy step of `hf_generate`."""
    out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD_ID, max_new_tokens=MAX_NEW,
                         do_sample=False, eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores, 1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@dataclasses.dataclass
class HFCase:
    kind: str
    model: object                # the transformers reference
    path: Path                   # save_pretrained directory
    eos_hit: int                 # a config eos id that the greedy batch generates in some rows only
    eos_never: int               # a config eos id that greedy generation never produces
    early_prompt: list[int]      # a prompt whose greedy continuation hits eos_hit before MAX_NEW
    greedy_no_eos: torch.Tensor  # HF greedy continuation [B, MAX_NEW] of BATCH_PROMPTS, eos disabled

    @property
    def eos_ids(self) -> list[int]:
        return [self.eos_hit, self.eos_never]


def make_case(kind: str, directory: Path, seed: int = 0) -> HFCase:
    """Build the model, pick its eos ids from what it generates (so that some rows stop early and
    others do not), then save_pretrained (safetensors) into `directory`."""
    model = build_hf_model(kind, seed)
    ids, mask = left_pad(BATCH_PROMPTS)
    # Generate with an eos id outside the vocabulary: nothing stops.
    model.config.eos_token_id = [VOCAB + 7]
    model.generation_config.eos_token_id = [VOCAB + 7]
    full = hf_generate(model, ids, mask, eos_token_id=[VOCAB + 7])[:, ids.shape[1]:]
    assert full.shape == (len(BATCH_PROMPTS), MAX_NEW)
    rows = [set(r.tolist()) for r in full]
    eos_hit = None
    for step in range(3, MAX_NEW // 2):
        for r in range(len(rows)):
            tok = int(full[r, step])
            first = full[r].tolist().index(tok)
            if first >= 3 and tok != PAD_ID and not all(tok in s for s in rows):
                eos_hit = tok
                early_row = r
                break
        if eos_hit is not None:
            break
    assert eos_hit is not None, "test setup: no token suitable as an early eos; change the seed"
    used = set().union(*rows) | {PAD_ID}
    eos_never = next(t for t in range(VOCAB - 1, 0, -1) if t not in used)
    margins = greedy_margins(model, ids, mask, [VOCAB + 7])
    assert margins.min() >= MIN_GREEDY_MARGIN, (
        f"test setup: greedy top-2 margin {margins.min():.2e} is too small for a fair parity test; change the seed")

    model.config.eos_token_id = [eos_hit, eos_never]
    model.generation_config.eos_token_id = [eos_hit, eos_never]
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(str(directory), safe_serialization=True)
    return HFCase(kind=kind, model=model, path=Path(directory), eos_hit=eos_hit, eos_never=eos_never,
                  early_prompt=BATCH_PROMPTS[early_row], greedy_no_eos=full)
