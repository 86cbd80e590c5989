"""Quantized checkpoints: `glmrt quantize` output (glmrt's versioned format), the released ChatGLM
int4/int8 layouts and GLM-130B rank files quantized by its scripts.

The released layouts are written here from the original code's rules, never with glmrt:
- quantization (ChatGLM-6B/2/3 `quantization.py`, GLM-130B `quantization/layers.py`):
  `scale = max|W_row| / (2^(bits-1) - 1)` (fp16), `q = round(W / scale)` as int8;
- INT4 packing (the `int4WeightCompression` CUDA kernel both ship):
  `out[i] = (in[2i] << 4) | (in[2i+1] & 0b1111)`, and `int4WeightExtraction`: `high = b >> 4`,
  `low = (b << 4) >> 4` (sign-extending), `w[2i] = high * scale`, `w[2i+1] = low * scale`;
- names: `<name>.weight` int8 + `<name>.weight_scale`, `quantization_bit` in config.json (ChatGLM);
  per tensor-parallel rank, `--quantization-bit-width` in the model script (GLM-130B).
The references dequantize with that formula in this file and run a float forward that owes glmrt
nothing: transformers (ChatGLM2/3 layout) or the original-code references of tests/models
(ChatGLM-6B, and GLM-130B simulated rank by rank, never merged).

Two checks per layout: (1) every quantized linear glmrt loaded, dequantized here with the formula
above, equals bit for bit the float weight glmrt's float loader (checked by tests/models) reads from
the dequantized checkpoint; (2) logits against the independent reference, with every node on the
torch reference op (`glmrt.load(..., kernels="reference")`: quantized linears dequantize, then matmul). The native kernels also quantize
activations to int8 (see native/cpu/gemv_quant.h); their numerics are tests/ops' business, and
they would blur a loader bug here.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from reference_glm_original import ChatGLM6BReference, GLM130BReference  # noqa: E402

import glmrt  # noqa: E402
import glmrt.quant  # noqa: E402
from glmrt.cli import main as cli_main  # noqa: E402
from glmrt.errors import CheckpointError, ConfigError  # noqa: E402
from glmrt.quantize_cmd import quantize_checkpoint  # noqa: E402

ATOL = 1e-4


# ----------------------------------------------------------------------------- the published formulas
def release_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """QuantizedLinear(weight=...): fp16 scale per output row, q = round(W / scale), INT4 compressed."""
    scale = (w.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)).half()
    q = torch.round(w / scale.float()[:, None]).to(torch.int8)
    return (compress_int4(q) if bits == 4 else q), scale


def compress_int4(q: torch.Tensor) -> torch.Tensor:
    """int4WeightCompression, element by element in Python integers (two's complement bytes)."""
    n, m = q.shape
    assert m % 2 == 0
    out = torch.empty(n, m // 2, dtype=torch.int8)
    vals = q.tolist()
    for r in range(n):
        for i in range(m // 2):
            byte = ((vals[r][2 * i] << 4) | (vals[r][2 * i + 1] & 0b1111)) & 0xFF
            out[r, i] = byte - 256 if byte > 127 else byte
    return out


def extract_int4(packed: torch.Tensor) -> torch.Tensor:
    """int4WeightExtraction's nibble values: high = b >> 4, low = (b << 4) >> 4, both sign-extended."""
    u = packed.to(torch.int16) & 0xFF
    hi, lo = u >> 4, u & 0xF
    hi = torch.where(hi >= 8, hi - 16, hi)
    lo = torch.where(lo >= 8, lo - 16, lo)
    return torch.stack((hi, lo), dim=-1).flatten(-2)


def release_dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    values = extract_int4(q) if bits == 4 else q
    return values.float() * scale.float()[:, None]


def dequantize_loaded(model, node) -> torch.Tensor:
    """A quantized linear of a loaded glmrt model, dequantized with this file's formula."""
    q = node.attrs["quant"]
    w, scale = model.weights[node.params["weight"]].cpu(), model.weights[node.params["scale"]].cpu().float()
    k = q["in_features"]
    values = (extract_int4(w)[:, :k] if q["bits"] == 4 else w).float()
    if q["group_size"] == 0:
        return values * scale[:, None]
    return values * scale.repeat_interleave(q["group_size"], dim=1)[:, :k]


def assert_weights_equal_dequantized(model, float_model) -> int:
    """Check (1) of the module docstring; returns how many linears were compared."""
    count = 0
    for node in model.graph.nodes:
        if "quant" in node.attrs:
            want = float_model.weights[node.params["weight"]].cpu()
            got = dequantize_loaded(model, node)
            assert torch.equal(got, want), f"{node.name}: max diff {(got - want).abs().max().item():.3e}"
            count += 1
    return count


def test_int4_packing_follows_the_release_kernel():
    q = torch.tensor([[-7, 7, 0, -1, 3, -8 + 1, 5, 2]], dtype=torch.int8)
    packed = compress_int4(q)
    # even index in the HIGH nibble: (-7, 7) -> 0x97 -> -105 as int8
    assert packed[0, 0].item() == -105  # 0x97: -7 (0x9) in the high nibble, 7 in the low one
    assert torch.equal(extract_int4(packed), q.to(torch.int16))
    assert torch.equal(glmrt.quant.pack_int4(q), packed)
    assert torch.equal(glmrt.quant.unpack_int4(packed, 8), q)


# ----------------------------------------------------------------------------- ChatGLM2/3 (THUDM) layout
CHATGLM2_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@pytest.fixture(scope="module")
def glm2_case():
    pytest.importorskip("transformers")
    import ckpt_writers as cw
    model = cw.build_hf_model("glm", seed=3)
    hf_cfg = model.config.to_dict()
    thudm_cfg = cw.thudm_config_from_hf(hf_cfg, rope_ratio=cw.ROPE_RATIO)
    sd = cw.hf_to_thudm({k: v.detach().clone() for k, v in model.state_dict().items()}, hf_cfg,
                        rope_ratio=cw.ROPE_RATIO)
    return cw, model, thudm_cfg, sd


def _quantize_thudm(sd: dict, bits: int) -> tuple[dict, dict]:
    """(quantized release state dict, the same model dequantized with the published formula)."""
    qsd, deq = dict(sd), dict(sd)
    for name in list(sd):
        if name.endswith(".weight") and any(f".{lin}.weight" in name for lin in CHATGLM2_LINEARS):
            q, scale = release_quantize(sd[name].float(), bits)
            qsd[name], qsd[name + "_scale"] = q, scale
            deq[name] = release_dequantize(q, scale, bits)
    return qsd, deq


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def chatglm2_release(request, glm2_case, tmp_path_factory):
    cw, model, thudm_cfg, sd = glm2_case
    bits = request.param
    qsd, deq = _quantize_thudm(sd, bits)
    d = tmp_path_factory.mktemp(f"chatglm2_int{bits}")
    cw.write_config(d, dict(thudm_cfg, quantization_bit=bits, torch_dtype="float16"))
    cw.write_torch_bin(d, qsd, num_shards=2)  # pytorch_model-0000X-of-00002.bin + index, as released
    float_dir = tmp_path_factory.mktemp(f"chatglm2_int{bits}_dequantized")
    cw.write_config(float_dir, thudm_cfg)
    cw.write_safetensors(float_dir, deq)
    reference = copy.deepcopy(model)
    reference.load_state_dict(cw.thudm_to_hf(deq, thudm_cfg))
    return bits, d, reference, cw, float_dir


def test_chatglm2_release_loads_as_is_and_matches_dequantized_transformers(chatglm2_release):
    bits, d, reference, cw, float_dir = chatglm2_release
    model = glmrt.load(str(d), dtype="float32", kernels="reference", progress=False)
    float_model = glmrt.load(str(float_dir), dtype="float32", progress=False)
    assert assert_weights_equal_dequantized(model, float_model) == 4 * model.config.num_layers
    quantized = [n for n in model.graph.nodes if "quant" in n.attrs]
    assert len(quantized) == 4 * model.config.num_layers
    assert all(n.attrs["quant"]["bits"] == bits and n.attrs["quant"]["group_size"] == 0 for n in quantized)
    w = model.weights["layers.0.attn.qkv.weight"]
    assert w.dtype == torch.int8 and w.shape[1] == model.config.hidden_size // (2 if bits == 4 else 1)
    assert model.weights["layers.0.attn.qkv.weight_scale"].dtype == torch.float16  # kept as stored
    for prompt in cw.BATCH_PROMPTS:
        ids = torch.tensor([prompt])
        err = (model.logits(ids) - cw.hf_logits(reference, ids)).abs().max().item()
        assert err <= ATOL, f"INT{bits}: max |glmrt - dequantized transformers| = {err:.2e}"


def test_chatglm2_release_rejects_requantizing(chatglm2_release):
    bits, d, _, _, _ = chatglm2_release
    other = "int8" if bits == 4 else "int4"
    with pytest.raises(ConfigError, match="already quantized"):
        glmrt.load(str(d), dtype="float32", quantize=other, progress=False)
    # naming the checkpoint's own format is accepted
    glmrt.load(str(d), dtype="float32", quantize=f"int{bits}", progress=False)


def test_release_scales_without_declared_bits_are_an_error(glm2_case, tmp_path):
    cw, _, thudm_cfg, sd = glm2_case
    qsd, _ = _quantize_thudm(sd, 4)
    cw.write_config(tmp_path, thudm_cfg)  # no quantization_bit
    cw.write_safetensors(tmp_path, qsd)
    with pytest.raises(CheckpointError, match="quantization_bit"):
        glmrt.load(str(tmp_path), dtype="float32", progress=False)


def test_release_missing_scale_is_named(glm2_case, tmp_path):
    cw, _, thudm_cfg, sd = glm2_case
    qsd, _ = _quantize_thudm(sd, 4)
    del qsd["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight_scale"]
    cw.write_config(tmp_path, dict(thudm_cfg, quantization_bit=4))
    cw.write_safetensors(tmp_path, qsd)
    with pytest.raises(CheckpointError, match=r"missing tensor transformer\.encoder\.layers\.1\.mlp\.dense_4h_to_h"
                                              r"\.weight_scale"):
        glmrt.load(str(tmp_path), dtype="float32", progress=False)


def test_release_wrong_bit_width_is_named(glm2_case, tmp_path):
    """INT4 tensors under a config that says 8 bits: the packed widths do not fit."""
    cw, _, thudm_cfg, sd = glm2_case
    qsd, _ = _quantize_thudm(sd, 4)
    cw.write_config(tmp_path, dict(thudm_cfg, quantization_bit=8))
    cw.write_safetensors(tmp_path, qsd)
    with pytest.raises(CheckpointError, match=r"query_key_value\.weight .*config needs"):
        glmrt.load(str(tmp_path), dtype="float32", progress=False)


# ----------------------------------------------------------------------------- ChatGLM-6B layout
C6_VOCAB, C6_HIDDEN, C6_HEADS, C6_LAYERS, C6_INNER = 200, 64, 4, 2, 128
C6_MASK, C6_GMASK, C6_SOP, C6_EOP = 190, 191, 194, 195
C6_CONFIG = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": C6_VOCAB, "hidden_size": C6_HIDDEN,
    "num_layers": C6_LAYERS, "num_attention_heads": C6_HEADS, "inner_hidden_size": C6_INNER,
    "layernorm_epsilon": 1e-5, "max_sequence_length": 256, "position_encoding_2d": True, "bos_token_id": C6_SOP,
    "eos_token_id": C6_EOP, "mask_token_id": C6_MASK, "gmask_token_id": C6_GMASK, "pad_token_id": 3,
    "torch_dtype": "float32",
}


def chatglm6b_state_dict(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return std * torch.randn(*shape, generator=g)

    hd = C6_HIDDEN // C6_HEADS
    sd = {"transformer.word_embeddings.weight": rnd(C6_VOCAB, C6_HIDDEN)}
    for i in range(C6_LAYERS):
        p = f"transformer.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = 1.0 + rnd(C6_HIDDEN, std=0.2)
        sd[f"{p}.input_layernorm.bias"] = rnd(C6_HIDDEN, std=0.1)
        sd[f"{p}.attention.query_key_value.weight"] = rnd(3 * C6_HIDDEN, C6_HIDDEN, std=0.3)
        sd[f"{p}.attention.query_key_value.bias"] = rnd(3 * C6_HIDDEN, std=0.1)
        sd[f"{p}.attention.rotary_emb.inv_freq"] = (1.0 / (10000 ** (torch.arange(0, hd // 2, 2).float()
                                                                     / (hd // 2)))).half()
        sd[f"{p}.attention.dense.weight"] = rnd(C6_HIDDEN, C6_HIDDEN, std=0.2)
        sd[f"{p}.attention.dense.bias"] = rnd(C6_HIDDEN, std=0.1)
        sd[f"{p}.post_attention_layernorm.weight"] = 1.0 + rnd(C6_HIDDEN, std=0.2)
        sd[f"{p}.post_attention_layernorm.bias"] = rnd(C6_HIDDEN, std=0.1)
        sd[f"{p}.mlp.dense_h_to_4h.weight"] = rnd(C6_INNER, C6_HIDDEN, std=0.2)
        sd[f"{p}.mlp.dense_h_to_4h.bias"] = rnd(C6_INNER, std=0.1)
        sd[f"{p}.mlp.dense_4h_to_h.weight"] = rnd(C6_HIDDEN, C6_INNER, std=0.2)
        sd[f"{p}.mlp.dense_4h_to_h.bias"] = rnd(C6_HIDDEN, std=0.1)
    sd["transformer.final_layernorm.weight"] = 1.0 + rnd(C6_HIDDEN, std=0.2)
    sd["transformer.final_layernorm.bias"] = rnd(C6_HIDDEN, std=0.1)
    sd["lm_head.weight"] = rnd(C6_VOCAB, C6_HIDDEN, std=0.3)
    return sd


C6_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@pytest.mark.parametrize("bits", [4, 8])
def test_chatglm6b_release_matches_original_reference(bits, tmp_path):
    sd = chatglm6b_state_dict()
    qsd, deq = dict(sd), dict(sd)
    for name in sd:
        if any(name.endswith(f"{lin}.weight") for lin in C6_LINEARS):
            q, scale = release_quantize(sd[name], bits)  # per-head interleaved QKV rows: scales follow them
            qsd[name], qsd[name + "_scale"] = q, scale
            deq[name] = release_dequantize(q, scale, bits)
    (tmp_path / "config.json").write_text(json.dumps(dict(C6_CONFIG, quantization_bit=bits,
                                                          quantization_embeddings=False)))
    torch.save(qsd, tmp_path / "pytorch_model.bin")
    model = glmrt.load(str(tmp_path), dtype="float32", kernels="reference", progress=False)
    float_dir = tmp_path / "dequantized"
    float_dir.mkdir()
    (float_dir / "config.json").write_text(json.dumps(C6_CONFIG))
    torch.save(deq, float_dir / "pytorch_model.bin")
    assert assert_weights_equal_dequantized(model, glmrt.load(str(float_dir), dtype="float32", progress=False)) == 8
    reference = ChatGLM6BReference(deq, C6_CONFIG)
    g = torch.Generator().manual_seed(2)
    for prompt in (torch.randint(10, 180, (9,), generator=g).tolist() + [C6_GMASK, C6_SOP],
                   torch.randint(10, 180, (3,), generator=g).tolist() + [C6_MASK, 17, 18, C6_SOP]):
        ids = torch.tensor([prompt])
        err = (model.logits(ids) - reference.forward(ids)).abs().max().item()
        assert err <= ATOL, f"ChatGLM-6B INT{bits}: {err:.2e}"


def test_chatglm6b_quantized_embeddings_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(C6_CONFIG, quantization_bit=4,
                                                          quantization_embeddings=True)))
    torch.save(chatglm6b_state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="quantization_embeddings"):
        glmrt.load(str(tmp_path), dtype="float32", progress=False)


# ----------------------------------------------------------------------------- GLM-130B SAT rank files
# INNER = 96: with 2 ranks dense_4h_to_h has 48 input columns per rank, not a power of two.
G_VOCAB, G_HIDDEN, G_HEADS, G_LAYERS, G_INNER = 200, 64, 8, 2, 96
G_MASK, G_GMASK, G_SOP, G_EOP, G_EOS = 190, 191, 194, 195, 196
G_TOKEN_IDS = {"mask": G_MASK, "gmask": G_GMASK, "smask": 192, "sop": G_SOP, "eop": G_EOP, "eos": G_EOS}
G_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def glm130b_state_dict(seed: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return std * torch.randn(*shape, generator=g)

    sd = {"transformer.word_embeddings.weight": rnd(G_VOCAB, G_HIDDEN, std=0.3)}
    for i in range(G_LAYERS):
        p = f"transformer.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{p}.{norm}.weight"] = 1.0 + rnd(G_HIDDEN, std=0.2)
            sd[f"{p}.{norm}.bias"] = rnd(G_HIDDEN, std=0.1)
        sd[f"{p}.attention.query_key_value.weight"] = rnd(3 * G_HIDDEN, G_HIDDEN, std=0.3)
        sd[f"{p}.attention.query_key_value.bias"] = rnd(3 * G_HIDDEN, std=0.1)
        sd[f"{p}.attention.dense.weight"] = rnd(G_HIDDEN, G_HIDDEN, std=0.2)
        sd[f"{p}.attention.dense.bias"] = rnd(G_HIDDEN, std=0.1)
        sd[f"{p}.mlp.dense_h_to_4h.weight"] = rnd(2 * G_INNER, G_HIDDEN, std=0.2)
        sd[f"{p}.mlp.dense_h_to_4h.bias"] = rnd(2 * G_INNER, std=0.1)
        sd[f"{p}.mlp.dense_4h_to_h.weight"] = rnd(G_HIDDEN, G_INNER, std=0.2)
        sd[f"{p}.mlp.dense_4h_to_h.bias"] = rnd(G_HIDDEN, std=0.1)
    sd["transformer.final_layernorm.weight"] = 1.0 + rnd(G_HIDDEN, std=0.2)
    sd["transformer.final_layernorm.bias"] = rnd(G_HIDDEN, std=0.1)
    return sd


def split_ranks(full: dict[str, torch.Tensor], P: int) -> list[dict[str, torch.Tensor]]:
    """SAT's tensor-parallel split (GLM-130B tools/convert_tp.py): embedding and QKV rows, GLU rows
    as [x1 shard; x2 shard], row-parallel weights by columns, the rest replicated."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(P)]
    for name, t in full.items():
        for r in range(P):
            if name.endswith("word_embeddings.weight") or ".query_key_value." in name:
                part = t.chunk(P, dim=0)[r]
            elif ".dense_h_to_4h." in name:
                x1, x2 = t.chunk(2, dim=0)
                part = torch.cat([x1.chunk(P, dim=0)[r], x2.chunk(P, dim=0)[r]], dim=0)
            elif name.endswith("attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
                part = t.chunk(P, dim=1)[r]
            else:
                part = t
            ranks[r][name] = part.clone().contiguous()
    return ranks


def quantize_ranks(ranks, bits):
    """quantization/__init__.py's quantize(model, bits) on every rank, as saved with
    --from-quantized-checkpoint: each rank's own weights, each its own scales."""
    qranks, deq = [], []
    for sd in ranks:
        q_sd, d_sd = dict(sd), dict(sd)
        for name in sd:
            if any(name.endswith(f"{lin}.weight") for lin in G_LINEARS):
                q, scale = release_quantize(sd[name], bits)
                q_sd[name], q_sd[name + "_scale"] = q, scale
                d_sd[name] = release_dequantize(q, scale, bits)
        qranks.append(q_sd)
        deq.append(d_sd)
    return qranks, deq


def write_sat(directory: Path, ranks, bits: int | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "latest").write_text("1000")
    (directory / "1000").mkdir(exist_ok=True)
    for r, sd in enumerate(ranks):
        torch.save({"module": sd}, directory / "1000" / f"mp_rank_{r:02d}_model_states.pt")
    quant = f"            --quantization-bit-width {bits} \\\n" if bits else ""
    (directory / "model_glm_130b_int.sh").write_text(
        'MODEL_TYPE="glm-130b"\nCHECKPOINT_PATH="/ckpt"\n'
        f"MP_SIZE={len(ranks)}\n"
        'MODEL_ARGS="--model-parallel-size ${MP_SIZE} \\\n'
        f"            --num-layers {G_LAYERS} \\\n            --hidden-size {G_HIDDEN} \\\n"
        f"            --inner-hidden-size {G_INNER} \\\n            --vocab-size {G_VOCAB} \\\n"
        f"            --num-attention-heads {G_HEADS} \\\n            --max-sequence-length 256 \\\n"
        "            --tokenizer-type icetk-glm-130B \\\n            --layernorm-order post \\\n"
        f"{quant}            --load ${{CHECKPOINT_PATH}} \\\n            --skip-init \\\n            --fp16\"\n")
    return directory


G_PROMPTS = [[11, 12, 13, 14, 15, 16, G_GMASK, G_SOP], [21, 22, G_MASK, 23, 24, 25, G_SOP]]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("P", [1, 2, 8])
def test_glm130b_quantized_ranks_match_rank_by_rank_reference(bits, P, tmp_path):
    qranks, deq = quantize_ranks(split_ranks(glm130b_state_dict(), P), bits)
    d = write_sat(tmp_path / "sat", qranks, bits)
    model = glmrt.load(str(d), dtype="float32", token_ids=G_TOKEN_IDS, kernels="reference", progress=False)
    float_model = glmrt.load(str(write_sat(tmp_path / "dequantized", deq, None)), dtype="float32",
                             token_ids=G_TOKEN_IDS, progress=False)
    assert assert_weights_equal_dequantized(model, float_model) == 8
    reference = GLM130BReference(deq, G_LAYERS, G_HIDDEN, G_HEADS)
    dense = next(n for n in model.graph.nodes if n.name == "layers.0.mlp.down")
    if P > 1:  # one scale per (row, rank): the merged layer is group-wise over the ranks' column blocks
        cols = G_INNER // P
        group = dense.attrs["quant"]["group_size"]
        assert cols % group == 0 and group & (group - 1) == 0
        assert model.weights["layers.0.mlp.down.weight_scale"].shape == (G_HIDDEN, G_INNER // group)
    for prompt in G_PROMPTS:
        ref = reference.logits_for_prompt(prompt, G_MASK, G_GMASK)
        err = (model.logits(torch.tensor([prompt])) - ref).abs().max().item()
        assert err <= ATOL, f"GLM-130B INT{bits}, {P} ranks: {err:.2e}"


def test_glm130b_int4_script_over_fp16_ranks_quantizes_on_load(tmp_path):
    """configs/model_glm_130b_int4.sh without --from-quantized-checkpoint: the FP16 rank files are
    quantized on load, as GLM-130B's initialize.py does."""
    ranks = split_ranks(glm130b_state_dict(), 2)
    plain = glmrt.load(str(write_sat(tmp_path / "fp16", ranks, None)), dtype="float32", token_ids=G_TOKEN_IDS,
                       quantize="int4", progress=False)
    scripted = glmrt.load(str(write_sat(tmp_path / "int4", ranks, 4)), dtype="float32", token_ids=G_TOKEN_IDS,
                          progress=False)
    assert any("quant" in n.attrs for n in scripted.graph.nodes)
    ids = torch.tensor([G_PROMPTS[0]])
    assert torch.equal(plain.logits(ids), scripted.logits(ids))


# ----------------------------------------------------------------------------- glmrt's own format
@pytest.fixture(scope="module")
def fp_source(glm2_case, tmp_path_factory):
    """A float THUDM-format ChatGLM2 checkpoint with a tokenizer file next to it."""
    cw, _, thudm_cfg, sd = glm2_case
    d = tmp_path_factory.mktemp("chatglm2_fp32")
    cw.write_config(d, thudm_cfg)
    cw.write_safetensors(d, sd, num_shards=2)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    return d


FORMATS = [(4, 0), (8, 0), (4, 32)]


@pytest.mark.parametrize("bits,group", FORMATS, ids=["int4", "int8", "int4-g32"])
def test_quantize_command_round_trip_is_identical(fp_source, bits, group, tmp_path, monkeypatch):
    dst = tmp_path / "q"
    summary = quantize_checkpoint(str(fp_source), dst, bits, group, progress=False)
    cfg = json.loads((dst / "config.json").read_text())
    entry = cfg["glmrt_quantization"]
    assert entry["format"] == "glmrt-weight-only" and entry["version"] == 1
    assert entry["bits"] == bits and entry["group_size"] == group
    assert sorted(entry["modules"]) == sorted(f"layers.{i}.{m}" for i in range(cfg["num_layers"])
                                              for m in ("attn.qkv", "attn.dense", "mlp.up", "mlp.down"))
    assert (dst / "tokenizer_config.json").is_file()
    assert summary["files"][0] == "model.safetensors"
    # Every stored weight against the published scheme, recomputed here from the float source
    # (reference: GLM_FAMILY.md's symmetric scheme, this file's own int4 unpacking): per row, or per
    # group of `group` columns (the last group may be short), s = max|w| / qmax in the stored scale
    # dtype, q = clamp(round(w / s), -qmax, qmax) exactly (round half to even), |q s - w| <= s / 2.
    src_weights = glmrt.load(str(fp_source), dtype="float32", progress=False).weights
    qmax = 2 ** (bits - 1) - 1
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert meta["glmrt_format"] == "glmrt-weight-only" and meta["glmrt_format_version"] == "1"
        for module in entry["modules"]:
            w = f.get_tensor(f"{module}.weight")
            s = f.get_tensor(f"{module}.weight_scale")
            src = src_weights[f"{module}.weight"].float()
            n, k = src.shape
            vals = (extract_int4(w)[:, :k] if bits == 4 else w).long()
            assert vals.shape == (n, k)
            if group == 0:
                want_scale = src.abs().amax(1) / qmax  # (N,)
                assert s.shape == (n,)
                scale_full = s.float()[:, None].expand(n, k)
            else:
                g = math.ceil(k / group)
                padded = torch.nn.functional.pad(src.abs(), (0, g * group - k))
                want_scale = padded.view(n, g, group).amax(2) / qmax  # (N, G), the last group short
                assert s.shape == (n, g)
                scale_full = s.float().repeat_interleave(group, dim=1)[:, :k]
            assert torch.equal(s, want_scale.to(s.dtype)), f"{module}: scales are not max|w| / {qmax} per group"
            want_q = torch.round(src / scale_full.clamp(min=torch.finfo(torch.float32).tiny)).clamp(-qmax, qmax)
            assert torch.equal(vals, want_q.long()), f"{module}: {(vals != want_q.long()).sum()} values differ"
            err = (vals.float() * scale_full - src).abs()
            assert bool((err <= scale_full / 2 * (1 + 1e-6) + 1e-12).all()), f"{module}: |q s - w| > s/2"

    # Loading never quantizes float weights again, and the logits are bit-identical.
    on_load = glmrt.load(str(fp_source), dtype="float32", quantize=f"int{bits}" + (f"-g{group}" if group else ""),
                         progress=False)

    def forbidden(*a, **k):
        raise AssertionError("loading a quantized checkpoint must not quantize float weights")
    monkeypatch.setattr(glmrt.quant, "quantize_weight", forbidden)
    loaded = glmrt.load(str(dst), progress=False)
    assert loaded.weights["layers.0.attn.qkv.weight"].dtype == torch.int8
    assert loaded.weight_bytes() == on_load.weight_bytes()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.equal(loaded.logits(ids), on_load.logits(ids))


def test_quantize_cli_sharded_and_layer_cut(fp_source, tmp_path, capsys):
    dst = tmp_path / "q"
    rc = cli_main(["quantize", str(fp_source), str(dst), "--bits", "4", "--layers", "1", "--max-shard-size", "20KB",
                   "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ratio_vs_fp16"] <= 0.28 + 1e-9
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((dst / "config.json").read_text())["num_layers"] == 1
    loaded = glmrt.load(str(dst), dtype="float32", progress=False)
    want = glmrt.load(str(fp_source), dtype="float32", layers=1, quantize="int4", progress=False)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(loaded.logits(ids), want.logits(ids))


def test_quantize_synthetic_preset(tmp_path):
    """synthetic:<preset> sources: the preset's config is written in its release format."""
    dst = tmp_path / "syn"
    summary = quantize_checkpoint("synthetic:chatglm-6b", dst, 8, 0, layers=1, dtype="float32", progress=False)
    assert summary["ratio_vs_fp16"] <= 0.53
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "chatglm" and cfg["num_layers"] == 1 and "position_encoding_2d" in cfg


@pytest.fixture
def quantized_dir(fp_source, tmp_path):
    dst = tmp_path / "q"
    quantize_checkpoint(str(fp_source), dst, 4, 0, progress=False)
    return dst


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_future_format_version_is_refused(quantized_dir):
    _edit_config(quantized_dir, lambda c: c["glmrt_quantization"].update(version=2))
    with pytest.raises(CheckpointError, match=r"version 2, written by a newer glmrt.*upgrade glmrt"):
        glmrt.load(str(quantized_dir), progress=False)


def test_unknown_format_name_is_refused(quantized_dir):
    _edit_config(quantized_dir, lambda c: c["glmrt_quantization"].update(format="something-else"))
    with pytest.raises(CheckpointError, match="not a checkpoint written by `glmrt quantize`"):
        glmrt.load(str(quantized_dir), progress=False)


def test_shard_of_another_version_is_refused(quantized_dir):
    path = quantized_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    save_file(tensors, str(path), metadata={"format": "pt", "glmrt_format": "glmrt-weight-only",
                                            "glmrt_format_version": "7"})
    with pytest.raises(CheckpointError, match="mixes files of different checkpoints"):
        glmrt.load(str(quantized_dir), progress=False)


def test_missing_quantized_tensor_is_named(quantized_dir):
    path = quantized_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys() if n != "layers.1.attn.dense.weight_scale"}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing tensor layers\.1\.attn\.dense\.weight_scale"):
        glmrt.load(str(quantized_dir), progress=False)


def test_requantizing_a_quantized_checkpoint_is_refused(quantized_dir):
    with pytest.raises(ConfigError, match="already quantized"):
        glmrt.load(str(quantized_dir), quantize="int8", progress=False)


def test_destination_is_never_overwritten(fp_source, quantized_dir):
    before = sorted(p.name for p in quantized_dir.iterdir())
    with pytest.raises(ConfigError, match="never overwrites"):
        quantize_checkpoint(str(fp_source), quantized_dir, 8, 0, progress=False)
    assert sorted(p.name for p in quantized_dir.iterdir()) == before


def test_failed_quantize_leaves_nothing(fp_source, tmp_path, monkeypatch):
    import glmrt.checkpoint
    real = glmrt.checkpoint.write_safetensors_shards

    def fail_after_first_shard(directory, tensors, metadata, max_shard_bytes, **kwargs):
        real(directory, dict(list(tensors.items())[:1]), metadata, max_shard_bytes)
        raise OSError("disk full")
    monkeypatch.setattr(glmrt.checkpoint, "write_safetensors_shards", fail_after_first_shard)
    dst = tmp_path / "never"
    with pytest.raises(OSError, match="disk full"):
        quantize_checkpoint(str(fp_source), dst, 4, 0, progress=False)
    assert not dst.exists() and not list(tmp_path.glob(".never.partial-*"))
