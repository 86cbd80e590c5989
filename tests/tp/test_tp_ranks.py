"""Tensor parallelism across real processes: N gloo ranks on the CPU, started like torchrun starts
them (tp_worker.py, launch.py), against the single-process model of the same synthetic weights.

One job per tensor-parallel size loads every generation's tiny model (tp_cases.py) in the same
process group; every wait is bounded, so a hang fails the test."""

from __future__ import annotations

import pytest
import torch

import glmrt
from glmrt.api import prepare
from glmrt.shard import merge_weights

import tp_cases
from launch import launch

NAMES = list(tp_cases.CASES)
SIZES = (2, 4, 8)
QUANT = {2: ["chatglm2=int4-g32", "glm-130b=int8-g32", "glm4-0414=int8"]}
JOB_TIMEOUT = 240  # seconds for a whole job (8 processes on a small shared CI machine)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoint directories in the releases' layouts, which the ranks read as slices: GLM-130B's
    SAT rank files (8 of them, and 1), transformers glm4 safetensors (separate q / k / v) in two
    shards, THUDM ChatGLM2/3 safetensors (one blocked [Q|K|V] tensor)."""
    import ckpt_writers as cw
    import test_glm130b_parity as g130
    full = g130.make_full_state_dict()
    out = {"sat8": ("sat", g130.write_sat(tmp_path_factory.mktemp("sat8"), g130.split_like_sat(full, 8))),
           "sat1": ("sat", g130.write_sat(tmp_path_factory.mktemp("sat1"), [full]))}
    hf = cw.hf_glm_config(model_type="glm4", vocab_size=256, num_attention_heads=8, head_dim=8,
                          intermediate_size=128, num_key_value_heads=2)
    out["glm4-hf"] = ("glm", cw.write_hf_checkpoint(tmp_path_factory.mktemp("glm4hf"), hf,
                                                    cw.random_hf_glm_state_dict(hf), num_shards=2))
    glm = dict(hf, model_type="glm", architectures=["GlmForCausalLM"], rope_theta=10000.0)
    sd = cw.random_hf_glm_state_dict(glm, seed=3)
    thudm = cw.thudm_config_from_hf(glm, rope_ratio=1.0)
    out["chatglm2-thudm"] = ("glm", cw.write_hf_checkpoint(tmp_path_factory.mktemp("thudm"), thudm,
                                                           cw.hf_to_thudm(sd, glm)))
    # ChatGLM-6B (per-head interleaved qkv) with 8 heads, as safetensors (read with pread) and .bin
    import test_chatglm6b_parity as c6
    c6_sd, c6_cfg = c6.make_state_dict(), dict(c6.CONFIG, num_attention_heads=8)
    d = tmp_path_factory.mktemp("c6st")
    cw.write_config(d, c6_cfg)
    cw.write_safetensors(d, c6_sd)
    out["chatglm6b-safetensors"] = ("c6", d)
    out["chatglm6b-bin"] = ("c6", c6.write_checkpoint(tmp_path_factory.mktemp("c6bin"), c6_sd, config=c6_cfg))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ckpts):
    dirs = [f"dir:{key}:{prompts}:{path}" for key, (prompts, path) in ckpts.items()]
    out = {}
    for size in SIZES:
        d = tmp_path_factory.mktemp(f"tp{size}")
        results, _ = launch(size, d, ["cases", *NAMES, *QUANT.get(size, []), *dirs], JOB_TIMEOUT)
        out[size] = results
    return out


@pytest.fixture(scope="module")
def single():
    tp_cases.register()
    out = {}
    for name in NAMES:
        model = glmrt.load(f"synthetic:tp-{name}", backend="cpu", dtype="float32", progress=False)
        out[name] = tp_cases.run(model, name)
        out[name]["weights"] = model.weights
        out[name]["graph"] = prepare(f"synthetic:tp-{name}", dtype="float32", progress=False,
                                     materialize=False).graph
    for specs in QUANT.values():
        for spec in specs:
            name, fmt = spec.split("=")
            # the reference kernels (dequantize, then matmul): the native CPU kernels also quantize the
            # activations to int8, where a 1e-7 difference of summation order can flip a rounding
            model = glmrt.load(f"synthetic:tp-{name}", backend="cpu", dtype="float32", progress=False, quantize=fmt,
                               kernels="reference")
            out[spec] = tp_cases.run(model, name)
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("key", ["sat8", "sat1", "glm4-hf", "chatglm2-thudm", "chatglm6b-safetensors",
                                 "chatglm6b-bin"])
def test_checkpoints_read_as_rank_slices_give_the_single_process_logits(runs, ckpts, size, key):
    """GLM-130B's 8 SAT rank files taken as they are at tp 8, merged two or four at a time at tp 4
    and 2 (and the 1-rank checkpoint split), and safetensors read with get_slice, all give the
    logits of the single-process load of the same directory."""
    prompts, path = ckpts[key]
    ref = tp_cases.run(glmrt.load(str(path), backend="cpu", dtype="float32", progress=False,
                                  **tp_cases.load_kwargs(prompts)), prompts)
    for rank, result in runs[size].items():
        got = result[key]
        _close(got["logits"], ref["logits"], f"{key} tp {size} rank {rank}")
        _close(got["step_logits"], ref["step_logits"], f"{key} tp {size} rank {rank} decode")
        assert torch.equal(got["tokens"], ref["tokens"])


def _close(a, b, what):
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item()
    assert err <= 1e-4, f"{what}: max |difference| {err:.3g} > 1e-4"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_every_rank_matches_the_single_process_model(runs, single, size, name):
    ref = single[name]
    for rank, result in runs[size].items():
        got = result[name]
        _close(got["logits"], ref["logits"], f"tp {size} rank {rank} prefill logits")
        assert got["step_logits"].shape[0] == tp_cases.NEW_TOKENS  # prefill + 16 cached decode steps
        _close(got["step_logits"], ref["step_logits"], f"tp {size} rank {rank} decode-step logits")
        assert torch.equal(got["tokens"], ref["tokens"]), f"tp {size} rank {rank}: greedy tokens differ"
        # identical, bit for bit, on every rank: the gathered logits are the same tensor everywhere
        first = runs[size][0][name]
        assert torch.equal(got["logits"], first["logits"]) and torch.equal(got["step_logits"], first["step_logits"])


@pytest.mark.parametrize("size", SIZES)
def test_two_all_reduces_per_layer_plus_embedding_and_head(runs, size):
    for name in NAMES:
        layers = tp_cases.CASES[name].get("num_layers") or tp_cases.CASES[name]["num_hidden_layers"]
        counts = runs[size][0][name]["counts"]
        steps = [{k: b.get(k, 0) - a.get(k, 0) for k in b if b.get(k, 0) != a.get(k, 0)}
                 for a, b in zip(counts, counts[1:])]
        assert len(steps) == tp_cases.NEW_TOKENS - 1
        for step in steps:  # one cached decode step each
            assert step == {"all_reduce": 2 * layers + 1, "all_gather": 1}, (name, step)


@pytest.mark.parametrize("size", SIZES)
def test_kv_groups_are_split_or_replicated(runs, single, size):
    for name in ("chatglm2", "glm", "glm4-0414"):  # 2 KV groups
        kv = [runs[size][r][name]["kv_heads"] for r in range(size)]
        assert kv == [max(1, 2 // size)] * size
        # rank r's K rows are those of KV group r // (size / 2) (vLLM's #2379 bug took r % 2)
        full = single[name]["weights"]["layers.0.attn.qkv.weight"]
        hd, nh = 8, 8
        for r in range(size):
            local = runs[size][r][name]["weights"]["layers.0.attn.qkv.weight"]
            k_local = local[nh // size * hd:nh // size * hd + kv[r] * hd]
            group = r // (size // 2) if size > 2 else r
            k_full = full[nh * hd + group * kv[r] * hd:nh * hd + (group + 1) * kv[r] * hd]
            assert torch.equal(k_local, k_full), (name, size, r)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_the_ranks_weights_merge_back_to_the_whole_model(runs, single, size, name):
    merged = merge_weights(single[name]["graph"], [runs[size][r][name]["weights"] for r in range(size)])
    full = single[name]["weights"]
    assert set(merged) == set(full)
    for key in full:
        assert torch.equal(merged[key], full[key]), key


@pytest.mark.parametrize("spec", QUANT[2])
def test_quantization_after_sharding_matches_the_single_process_quantized_model(runs, single, spec):
    ref = single[spec]
    for rank, result in runs[2].items():
        got = result[spec]
        if spec.endswith("-g32"):  # the ranks' groups are the whole model's groups: same numbers
            _close(got["logits"], ref["logits"], f"{spec} rank {rank}")
            _close(got["step_logits"], ref["step_logits"], f"{spec} rank {rank} decode")
            assert torch.equal(got["tokens"], ref["tokens"])
        else:  # per-channel: each rank scales its own columns (as GLM-130B's per-rank quantization)
            err = (got["logits"] - ref["logits"]).abs().max().item()
            assert 0 < err < 0.05 * ref["logits"].abs().max().item(), err


def test_a_rank_that_hangs_fails_the_others_within_the_timeout(tmp_path):
    results, logs = launch(2, tmp_path, ["hang"], timeout=60, wait_for=[0])
    r0 = results[0]
    assert r0["error"] == "DistributedError", (r0, logs[0][-2000:])
    assert "timeout" in r0["message"] and "3 s" in r0["message"]
    assert r0["seconds"] < 30


def test_peak_host_memory_per_rank_is_about_the_rank_share(tmp_path):
    """Loading an 82 MB safetensors checkpoint: the peak resident memory a rank adds while loading
    (VmRSS, sampled every 2 ms, file pages it maps included) is its quarter of the weights plus
    the small overhead one process pays too (measured: 28 MB at tp 4 for 21 MB of weights, 91 MB
    at tp 1 for 82 MB), not the whole model."""
    import ckpt_writers as cw
    hf = cw.hf_glm_config(model_type="glm4", vocab_size=8192, hidden_size=512, num_attention_heads=8, head_dim=64,
                          intermediate_size=1536, num_key_value_heads=2, num_hidden_layers=4)
    ckpt = cw.write_hf_checkpoint(tmp_path / "ckpt", hf, cw.random_hf_glm_state_dict(hf), num_shards=2)
    peaks = {}
    for size in (1, 4):
        (tmp_path / f"m{size}").mkdir()
        peaks[size], _ = launch(size, tmp_path / f"m{size}", ["memory", str(ckpt)], JOB_TIMEOUT)
    total = peaks[1][0]["weight_bytes"]
    single_overhead = peaks[1][0]["peak_bytes"] - total
    for rank, got in peaks[4].items():
        assert abs(got["weight_bytes"] - total / 4) < 0.05 * total
        overhead = got["peak_bytes"] - got["weight_bytes"]
        assert overhead <= max(single_overhead, 0) + 0.05 * total, (rank, got, single_overhead)
        assert got["peak_bytes"] < 0.4 * peaks[1][0]["peak_bytes"], (rank, got, peaks[1][0])


def test_two_threads_sharing_a_tensor_parallel_model(tmp_path):
    """tp_worker.job_threads: two threads in the same order on every rank get the single-process
    tokens; in a different order on each rank every call fails with an error naming the mismatch
    (a whole call holds the model, and the ranks check they start the same call), and the model
    works afterwards."""
    from tp_worker import THREAD_PROMPTS
    tp_cases.register()
    single = glmrt.load("synthetic:tp-chatglm2", backend="cpu", dtype="float32", progress=False)
    want = [single.generate([p], max_new_tokens=12, eos_token_id=[])[0, len(p):].tolist() for p in THREAD_PROMPTS]
    results, logs = launch(2, tmp_path, ["threads"], JOB_TIMEOUT)
    for rank, out in results.items():
        assert out["ordered_a"] == want[0] and out["ordered_b"] == want[1], (rank, out, logs[rank][-2000:])
        for key in ("crossed_0", "crossed_1"):
            assert isinstance(out[key], str) and "the ranks started different calls" in out[key], (rank, out[key])
        assert out["after"] == want[1]
