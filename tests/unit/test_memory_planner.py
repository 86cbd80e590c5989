"""The memory planner (`glmrt memory`, glmrt.memory; issue 13 item 4).

The independent check is the loaded model: at tensor_parallel=1 the planner's weight bytes, computed
from the graph without loading anything, must equal Model.weight_bytes() of glmrt.load for the same
model, dtype and quantization. The releases' own tables are the other reference: GLM-130B's
README (2048 tokens, batch 1: FP16 on 8 x A100-40G but not on 8 x V100-32G, which it runs with
offloading; INT8 on 8 x RTX 3090 and not on 4; INT4 on 4 x RTX 3090 and on 8 x RTX 2080 Ti) and the
ChatGLM-6B / ChatGLM2-6B READMEs (INT4 in about 6 GB).
"""

from __future__ import annotations

import json
import math

import pytest

import glmrt
from glmrt import checkpoint
from glmrt.cli import main
from glmrt.errors import ConfigError
from glmrt.memory import (DEVICES, GiB, TENSOR_PARALLEL_SIZES, USABLE_FRACTION, device_by_name, device_with_memory,
                          plan_memory)

from tiny_models import thudm_config, write_checkpoint


def _tp(result: dict, tp: int) -> dict:
    return next(r for r in result["sizes"] if r["tensor_parallel"] == tp)


# ----------------------------------------------------------------------------- against the loaded model
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny"), thudm_config(vocab=96, eos=95, layers=2)))


@pytest.mark.parametrize("dtype,quantize", [("float32", None), ("bfloat16", None), ("float32", "int8"),
                                            ("float32", "int4"), ("bfloat16", "int4-g32")])
def test_tp1_weight_bytes_equal_the_loaded_tiny_model(tiny_dir, dtype, quantize):
    planned = _tp(plan_memory(tiny_dir, dtype=dtype, quantize=quantize, context=256), 1)["breakdown"]["weights_total"]
    loaded = glmrt.load(tiny_dir, backend="cpu", dtype=dtype, quantize=quantize, progress=False).weight_bytes()
    assert planned == loaded


@pytest.mark.parametrize("dtype,quantize", [("float32", None), ("bfloat16", None), ("bfloat16", "int8"),
                                            ("bfloat16", "int4")])
def test_tp1_weight_bytes_equal_the_loaded_cut_preset(dtype, quantize, monkeypatch):
    # The byte count does not depend on the values: zeros instead of random draws keep the load of
    # a real-width layer and its 65024-row embedding and head fast (the real load path otherwise).
    import torch
    monkeypatch.setattr(torch, "randn", lambda shape, generator=None: torch.zeros(shape))
    preset = "synthetic:chatglm3-6b"
    planned = _tp(plan_memory(preset, dtype=dtype, quantize=quantize, layers=1), 1)["breakdown"]
    model = glmrt.load(preset, backend="cpu", dtype=dtype, quantize=quantize, layers=1, progress=False)
    assert planned["weights_total"] == model.weight_bytes()
    assert (planned["weights_quantized"] > 0) == (quantize is not None)


def test_planning_reads_no_weight(tiny_dir, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the planner read a weight")
    monkeypatch.setattr(checkpoint, "load_weights", refuse)
    monkeypatch.setattr(checkpoint.WeightFiles, "get", refuse)
    monkeypatch.setattr(glmrt.api, "synthetic_weights", refuse)
    assert _tp(plan_memory(tiny_dir, quantize="int4", context=256), 1)["bytes_per_device"] > 0
    assert _tp(plan_memory("synthetic:glm-130b"), 8)["bytes_per_device"] > 0


# ----------------------------------------------------------------------------- the releases' tables
@pytest.mark.parametrize("quantize,device,fits,not_fits,smallest", [
    (None, "a100-40g", [8], [4], 8),
    (None, "v100-32g", [], [8], None),  # the release runs it with CPU offloading
    ("int8", "rtx3090", [8], [4], 8),
    ("int4", "rtx3090", [4, 8], [2], 4),
    ("int4", "rtx2080ti", [8], [4], 8),
])
def test_glm130b_release_table(quantize, device, fits, not_fits, smallest):
    result = plan_memory("synthetic:glm-130b", device=device_by_name(device), quantize=quantize, context=2048, batch=1)
    for tp in fits:
        assert _tp(result, tp)["fits"] is True, (tp, _tp(result, tp)["bytes_per_device"] / GiB)
    for tp in not_fits:
        assert _tp(result, tp)["fits"] is False, (tp, _tp(result, tp)["bytes_per_device"] / GiB)
    assert result["tensor_parallel"] == smallest


def test_chatglm_int4_in_about_6_gb():
    six = device_with_memory(6)
    # ChatGLM2-6B's README: INT4 encodes 2048 tokens in 5.5 GB.
    glm2 = plan_memory("synthetic:chatglm2-6b", device=six, quantize="int4", context=2048)
    assert glm2["tensor_parallel"] == 1 and _tp(glm2, 1)["bytes_per_device"] <= 6e9
    # ChatGLM-6B's README: INT4 inference in 6 GB (a chat turn; its layer-scaled attention keeps the
    # T x T scores, so 2048 tokens need more, and the planner says so).
    glm1 = plan_memory("synthetic:chatglm-6b", device=six, quantize="int4", context=512)
    assert glm1["tensor_parallel"] == 1 and 5e9 <= _tp(glm1, 1)["bytes_per_device"] <= 6e9
    assert plan_memory("synthetic:chatglm-6b", device=six, quantize="int4", context=2048)["tensor_parallel"] == 2
    # ... and FP16 does not fit (13 GB in the README).
    assert plan_memory("synthetic:chatglm-6b", device=six, context=512)["tensor_parallel"] == 4


# ----------------------------------------------------------------------------- sharding rules
def test_kv_groups_are_replicated_beyond_their_count_and_norms_never_split():
    result = plan_memory("synthetic:chatglm3-6b", context=4096, batch=2)  # 2 KV groups
    kv = {r["tensor_parallel"]: r["breakdown"]["kv_cache"] for r in result["sizes"]}
    assert kv[1] == 2 * kv[2] and kv[2] == kv[4] == kv[8]  # one whole group per rank from tp 2 on
    norms = {r["tensor_parallel"]: r["breakdown"]["weights"]["norms"]["float"] for r in result["sizes"]}
    assert len(set(norms.values())) == 1
    # The vocabulary-parallel embedding and the row-split MLP shrink with tp exactly.
    for kind in ("embedding", "lm_head", "mlp"):
        per = {r["tensor_parallel"]: r["breakdown"]["weights"][kind]["float"] for r in result["sizes"]}
        assert per[1] == 2 * per[2] == 4 * per[4] == 8 * per[8], kind
    # Attention: query heads split, the 2 KV groups' rows stay whole from tp 2 on.
    cfg = glmrt.api.prepare("synthetic:chatglm3-6b", materialize=False, progress=False).cfg
    attn = {r["tensor_parallel"]: r["breakdown"]["weights"]["attention"]["float"] for r in result["sizes"]}
    layer_kv_rows = 2 * 1 * cfg.head_dim  # k and v of one group
    for tp in (2, 4, 8):
        q_rows = cfg.num_heads * cfg.head_dim // tp
        qkv = (q_rows + layer_kv_rows) * (cfg.hidden_size + 1)  # weight + bias (qkv bias)
        dense = cfg.hidden_size * cfg.num_heads * cfg.head_dim // tp
        assert attn[tp] == cfg.num_layers * (qkv + dense) * 2, tp  # float16


def test_a_size_that_cannot_shard_is_named(tiny_dir):
    result = plan_memory(tiny_dir, device=device_by_name("rtx3090"), context=256)  # 4 heads
    row = _tp(result, 8)
    assert row["bytes_per_device"] is None and row["fits"] is False and "4 attention heads" in row["invalid"]
    assert result["tensor_parallel"] == 1


# ----------------------------------------------------------------------------- CLI, errors and --json
def test_unknown_device_lists_the_known_ones(capsys):
    assert main(["memory", "synthetic:chatglm3-6b", "--device", "a100"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'a100'" in err and all(name in err for name in DEVICES)


@pytest.mark.parametrize("value", ["abc", "0", "-8", "nan", "inf"])
def test_bad_memory_is_refused(capsys, value):
    assert main(["memory", "synthetic:chatglm3-6b", f"--memory={value}"]) == 2
    assert "--memory must be" in capsys.readouterr().err


def test_bad_context_and_batch_are_refused():
    with pytest.raises(ConfigError, match="context"):
        plan_memory("synthetic:chatglm-6b", context=0)
    with pytest.raises(ConfigError, match="exceeds the 2048 positions"):
        plan_memory("synthetic:chatglm-6b", context=4096)
    with pytest.raises(ConfigError, match="batch"):
        plan_memory("synthetic:chatglm-6b", batch=-1)


def test_device_and_memory_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["memory", "synthetic:chatglm3-6b", "--device", "h200", "--memory", "80"])


def test_json_schema(capsys):
    assert main(["memory", "glm-130b", "--device", "rtx3090", "--quantize", "int4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"model", "device", "sizes", "tensor_parallel"} <= set(out)
    assert out["model"] == "synthetic:glm-130b" and out["device"]["name"] == "rtx3090"
    assert out["device"]["memory_bytes"] == 24 * GiB
    assert out["device"]["budget_bytes"] == math.floor(24 * GiB * USABLE_FRACTION)
    assert [s["tensor_parallel"] for s in out["sizes"]] == list(TENSOR_PARALLEL_SIZES)
    for s in out["sizes"]:
        assert {"tensor_parallel", "bytes_per_device", "fits", "breakdown"} <= set(s)
        assert isinstance(s["bytes_per_device"], int) and isinstance(s["fits"], bool)
        b = s["breakdown"]
        assert s["bytes_per_device"] == b["weights_total"] + b["kv_cache"] + b["activations"] + b["runtime_overhead"]
        assert b["weights_total"] == sum(v["float"] + v["quantized"] for v in b["weights"].values())
        assert s["fits"] == (s["bytes_per_device"] <= out["device"]["budget_bytes"])
    assert out["tensor_parallel"] == 4


def test_text_output_without_a_device_names_the_devices_that_fit(capsys):
    assert main(["memory", "synthetic:chatglm3-6b", "--quantize", "int4"]) == 0
    out = capsys.readouterr().out
    assert "rtx2080ti" in out and "smallest" not in out


@pytest.mark.parametrize("preset", ["glm-130b", "chatglm-6b", "chatglm3-6b", "glm-4-9b", "glm-4-9b-0414", "glm-4-9b-hf"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4", "int4-g32"])
def test_per_rank_weight_bytes_equal_the_shard_pass(preset, quantize):
    """The planner's rules for one rank (its own reading of the tensor-parallel split) against what
    the shard pass really gives each rank (glmrt.shard, then quantization after sharding, as
    glmrt.load(tensor_parallel=N) does): the bytes of every rank's parameters, at every size the
    model can shard to. Graphs only (meta), one layer."""
    from glmrt.api import prepare
    from glmrt.memory import check_tensor_parallel, weight_bytes_per_rank
    from glmrt.quant import parse_format, quantize_graph
    from glmrt.shard import shard_graph

    graph = prepare(f"synthetic:{preset}", layers=1, materialize=False, progress=False).graph
    fmt = parse_format(quantize)
    checked = 0
    for tp in (2, 4, 8):
        if check_tensor_parallel(graph, tp) is not None:
            continue
        planned = weight_bytes_per_rank(quantize_graph(graph, *fmt) if fmt else graph, tp)
        planned_total = sum(v["float"] + v["quantized"] for v in planned.values())
        for rank in (0, tp - 1):
            local = shard_graph(graph, tp, rank)
            if fmt:
                local = quantize_graph(local, *fmt)
            real = sum(math.prod(p.shape) * p.dtype.itemsize for p in local.params.values())
            assert planned_total == real, (preset, quantize, tp, rank, planned_total, real)
        checked += 1
    assert checked, f"{preset}: no tensor-parallel size checked"
