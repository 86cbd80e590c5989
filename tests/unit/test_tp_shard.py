"""The shard pass (glmrt.shard) without processes: sizes refused with their numbers, the rewritten
graph of every generation, the GLU halves, the KV rule, shard-then-merge round trips (float and
quantized), and the process-group checks of glmrt.distributed."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import glmrt
from glmrt.api import prepare, synthetic_weights
from glmrt.distributed import DistributedError, init_tensor_parallel
from glmrt.errors import ConfigError
from glmrt.graph import build_graph
from glmrt.models import config_from_dict
from glmrt.quant import quantize_graph, quantize_weights
from glmrt.shard import (ALL_GATHER, ALL_REDUCE, merge_weights, param_shards, shard_graph, shard_weights,
                         tp_layout)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tp"))
import tp_cases  # noqa: E402


def cfg_of(name, **over):
    return config_from_dict(dict(tp_cases.CASES[name], **over))[1]


@pytest.mark.parametrize("name", list(tp_cases.CASES))
@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_the_sharded_graph_has_two_all_reduces_per_layer_plus_embedding_and_head(name, size):
    cfg = cfg_of(name)
    g = shard_graph(build_graph(cfg, torch.float32), size, 0)
    reduces = [n for n in g.nodes if n.op == ALL_REDUCE]
    gathers = [n for n in g.nodes if n.op == ALL_GATHER]
    assert len(reduces) == 2 * cfg.num_layers + 1 and len(gathers) == 1
    order = [n.name for n in g.nodes]
    for i in range(cfg.num_layers):
        # the reduce, with the full bias, comes before the residual (DeepNorm's alpha) and any norm
        dense = order.index(f"layers.{i}.attn.dense.all_reduce")
        assert order[dense - 1] == f"layers.{i}.attn.dense" and "bias" not in g.nodes[dense - 1].params
        assert ("bias" in g.nodes[dense].params) == cfg.dense_bias
        after = g.nodes[dense + 1]
        assert g.nodes[dense].outputs[0] in after.inputs
        assert after.op == ("norm" if cfg.norm_placement == "sandwich" else "residual")


def test_invalid_sizes_are_refused_naming_the_numbers():
    with pytest.raises(ConfigError, match=r"tensor_parallel=3 does not divide the 8 attention heads"):
        tp_layout(cfg_of("chatglm2"), 3, 0)
    with pytest.raises(ConfigError, match=r"tensor_parallel=16 does not divide the 8 attention heads"):
        tp_layout(cfg_of("glm-130b"), 16, 0)
    odd_groups = cfg_of("glm", num_attention_heads=12, num_key_value_heads=3, head_dim=8, hidden_size=96)
    with pytest.raises(ConfigError, match=r"tensor_parallel=2 and the 3 KV groups .* neither divide"):
        tp_layout(odd_groups, 2, 0)
    with pytest.raises(ConfigError, match=r"does not divide ffn_hidden_size 100"):
        tp_layout(cfg_of("glm4-0414", intermediate_size=100), 8, 0)
    with pytest.raises(ConfigError, match="positive integer"):
        tp_layout(cfg_of("glm"), 0, 0)
    # at load, before any weight is read
    tp_cases.register()
    with pytest.raises(ConfigError, match=r"tensor_parallel=3 does not divide the 8 attention heads"):
        prepare("synthetic:tp-chatglm2", tensor_parallel=(3, 0), progress=False)
    # groups that a rank's columns would cut
    with pytest.raises(ConfigError, match=r"16 input columns, not a multiple of 32"):
        prepare("synthetic:tp-chatglm2", quantize="int4-g32", tensor_parallel=(4, 0), progress=False)


def test_the_glu_projection_is_split_per_half():
    cfg = cfg_of("glm-130b")  # GeGLU: a * gelu(b), F = 128
    shards = param_shards(build_graph(cfg, torch.float32), 4, 1)
    assert shards["layers.0.mlp.up.weight"].ranges == ((32, 64), (128 + 32, 128 + 64))
    assert shards["layers.0.mlp.up.bias"].ranges == ((32, 64), (128 + 32, 128 + 64))
    assert shards["layers.0.mlp.down.weight"].dim == 1 and shards["layers.0.mlp.down.weight"].ranges == ((32, 64),)
    assert shards["layers.0.mlp.down.bias"].dim is None  # the full bias, once, after the reduce
    six = param_shards(build_graph(cfg_of("chatglm-6b"), torch.float32), 4, 1)  # plain GELU: one range
    assert six["layers.0.mlp.up.weight"].ranges == ((32, 64),)


def test_kv_groups_fewer_than_ranks_are_replicated_on_the_ranks_that_read_them():
    cfg = cfg_of("chatglm2")  # 8 heads, 2 groups, head_dim 8: q rows 0-63, k 64-79, v 80-95
    g = build_graph(cfg, torch.float32)
    want = {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1}
    for r in range(8):
        rows = param_shards(g, 8, r)["layers.0.attn.qkv.weight"].ranges
        k = want[r]
        assert rows == ((r * 8, r * 8 + 8), (64 + k * 8, 64 + k * 8 + 8), (80 + k * 8, 80 + k * 8 + 8))
    at2 = param_shards(g, 2, 1)["layers.0.attn.qkv.bias"].ranges
    assert at2 == ((32, 64), (72, 80), (88, 96))


def test_the_vocabulary_is_split_with_the_last_rank_padded_and_the_tied_head_shares_it():
    cfg = cfg_of("glm-130b")  # V 300 at tp 8: 38 rows per rank, the last holds 34 plus 4 zero rows
    g = build_graph(cfg, torch.float32)
    w = synthetic_weights(g)
    last = shard_weights(g, w, 8, 7)["embed.weight"]
    assert last.shape == (38, 64) and torch.equal(last[:34], w["embed.weight"][266:]) and not last[34:].any()
    sg = shard_graph(g, 8, 7)
    emb = next(n for n in sg.nodes if n.op == "embedding")
    head = next(n for n in sg.nodes if n.op == "lm_head")
    assert emb.attrs["vocab_start"] == 266 and emb.attrs["vocab_rows"] == 34
    assert head.params["weight"] == "embed.weight"  # tied


@pytest.mark.parametrize("name", list(tp_cases.CASES))
@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("fmt", [None, (8, 0), (4, 8)])
def test_shard_then_merge_round_trips(name, size, fmt):
    g = build_graph(cfg_of(name), torch.float32)
    w = synthetic_weights(g)
    if fmt is not None:  # a quantized checkpoint is sharded as it is stored (packed bytes, scales)
        q = quantize_graph(g, *fmt)
        w, g = quantize_weights(g, q, w), q
    ranks = [shard_weights(g, w, size, r) for r in range(size)]
    for r, local in enumerate(ranks):
        sg = shard_graph(g, size, r)
        assert {k: tuple(v.shape) for k, v in local.items()} == {k: tuple(p.shape) for k, p in sg.params.items()}
    merged = merge_weights(g, ranks)
    for key in w:
        assert torch.equal(merged[key], w[key]), key


def test_quantization_happens_after_sharding_on_each_ranks_slice():
    tp_cases.register()
    full = prepare("synthetic:tp-glm-130b", dtype="float32", progress=False)
    from glmrt.quant import quantize_weight
    for r in range(2):
        prep = prepare("synthetic:tp-glm-130b", dtype="float32", quantize="int8", tensor_parallel=(2, r),
                       progress=False)
        down = full.weights["layers.1.mlp.down.weight"][:, r * 64:(r + 1) * 64]
        q, s = quantize_weight(down, 8, 0)  # per output row of the rank's columns, as GLM-130B does
        assert torch.equal(prep.weights["layers.1.mlp.down.weight"], q)
        assert torch.equal(prep.weights["layers.1.mlp.down.weight_scale"], s)
        node = next(n for n in prep.graph.nodes if n.name == "layers.1.mlp.down")
        assert node.attrs["quant"]["in_features"] == 64


def test_a_missing_process_group_or_a_wrong_world_size_is_a_clear_error(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DistributedError, match=r"torchrun --nproc-per-node 2"):
        glmrt.load("synthetic:chatglm3-6b", layers=1, backend="cpu", tensor_parallel=2, progress=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(DistributedError, match=r"tensor_parallel=4 but torchrun started WORLD_SIZE=2"):
        init_tensor_parallel(4, "gloo", "cpu")
    with pytest.raises(DistributedError, match=r"declares no collective backend"):
        init_tensor_parallel(2, None, "onnxruntime")


def _tiny_checkpoints(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
    import ckpt_writers as cw
    import test_chatglm6b_parity as c6
    hf = cw.hf_glm_config(model_type="glm4", vocab_size=256, num_attention_heads=8, head_dim=8,
                          intermediate_size=128, num_key_value_heads=2)
    sd = cw.random_hf_glm_state_dict(hf)
    glm = dict(hf, model_type="glm", architectures=["GlmForCausalLM"], rope_theta=10000.0)
    dirs = {"glm4": cw.write_hf_checkpoint(tmp_path / "glm4", hf, sd, num_shards=2),
            "thudm": cw.write_hf_checkpoint(tmp_path / "thudm", cw.thudm_config_from_hf(glm, rope_ratio=1.0),
                                            cw.hf_to_thudm(cw.random_hf_glm_state_dict(glm), glm))}
    c6_cfg = dict(c6.CONFIG, num_attention_heads=8)
    cw.write_config(tmp_path / "c6st", c6_cfg)
    cw.write_safetensors(tmp_path / "c6st", c6.make_state_dict())
    dirs["c6-safetensors"] = tmp_path / "c6st"
    dirs["c6-bin"] = c6.write_checkpoint(tmp_path / "c6bin", c6.make_state_dict(), config=c6_cfg)
    return dirs


def test_a_rank_reads_only_its_slices_of_the_split_tensors(tmp_path, monkeypatch):
    """Every tensor the shard pass splits is read as a slice (WeightFiles.get is never asked for
    it), whatever the stored layout: separate q / k / v, blocked [Q|K|V], per-head interleaved;
    and the slices equal the whole load's shards."""
    from glmrt import checkpoint
    from glmrt.api import prepare
    dirs = _tiny_checkpoints(tmp_path)
    full = {k: prepare(str(d), dtype="float32", progress=False) for k, d in dirs.items()}
    real_get = checkpoint.WeightFiles.get
    split = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "query_key_value.weight",
             "query_key_value.bias", "dense.weight", "dense_h_to_4h", "dense_4h_to_h.weight", "embed",
             "lm_head", "output_layer", "word_embeddings")

    def get(self, name):
        assert not any(s in name for s in split), f"{name} was read whole"
        return real_get(self, name)

    monkeypatch.setattr(checkpoint.WeightFiles, "get", get)
    for key, d in dirs.items():
        for rank in range(4):
            prep = prepare(str(d), dtype="float32", progress=False, tensor_parallel=(4, rank))
            want = shard_weights(full[key].graph, full[key].weights, 4, rank)
            for name, t in want.items():
                assert torch.equal(prep.weights[name], t), (key, rank, name)
