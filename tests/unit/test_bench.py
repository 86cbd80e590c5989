"""`glmrt bench` end to end on a tiny checkpoint, its output files and schema, the metric
arithmetic, and `--compare`.

The bench runs every setting in a fresh worker process, so one end-to-end run (module fixture)
costs a few worker start-ups; every check below reads that one run. The model is a tiny
transformers-format `glm` checkpoint (hidden 64, 2 layers, vocab 256) written here with plain
torch + safetensors. Speed is never asserted (PERF.md: speed is checked by benchmarks).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import glmrt
from glmrt import bench
from glmrt.bench import baselines, machine, metrics, render

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 64, 96, 2, 4, 2, 16
PROMPT_LEN, GEN_LEN = 8, 4


def write_tiny_glm_checkpoint(directory: Path) -> Path:
    """A transformers-format `glm` checkpoint (GlmForCausalLM names), fp32, random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": VOCAB, "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu", "attention_bias": True,
              "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 128, "tie_word_embeddings": False, "eos_token_id": [2, 3],
              "pad_token_id": 0, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (0.1 * torch.randn(*shape, generator=gen)).contiguous()

    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": 1 + rand(HIDDEN),
               "lm_head.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = 1 + rand(HIDDEN)
        tensors[f"{p}.post_attention_layernorm.weight"] = 1 + rand(HIDDEN)
        for name, rows in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
            tensors[f"{p}.self_attn.{name}_proj.weight"] = rand(rows, HIDDEN)
            tensors[f"{p}.self_attn.{name}_proj.bias"] = rand(rows)
        tensors[f"{p}.self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        tensors[f"{p}.mlp.gate_up_proj.weight"] = rand(2 * FFN, HIDDEN)
        tensors[f"{p}.mlp.down_proj.weight"] = rand(HIDDEN, FFN)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _unavailable_backend() -> str | None:
    return next((r["name"] for r in glmrt.list_backends() if not r["available"]), None)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_glm_checkpoint(tmp_path_factory.mktemp("tiny_glm"))


@pytest.fixture(scope="module")
def run(tiny_ckpt, tmp_path_factory):
    """One bench run on the CPU: float32 and int8, both baselines, repeat 1, into a tmp dir."""
    out = tmp_path_factory.mktemp("bench_out")
    unavailable = _unavailable_backend()
    backends = "cpu" + (f",{unavailable}" if unavailable else "")
    argv = [str(tiny_ckpt), "--backends", backends, "--dtype", "float32", "--quantize", "none,int8",
            "--baseline", "torch-eager,transformers", "--repeat", "1", "--warmup", "0",
            "--prompt-len", str(PROMPT_LEN), "--gen-len", str(GEN_LEN), "--threads", "2", "--out", str(out)]
    code = bench.main(argv)
    doc = json.loads((out / "results.json").read_text())
    return {"code": code, "out": out, "doc": doc, "unavailable": unavailable,
            "by_id": {r["id"]: r for r in doc["results"]}}


def test_run_succeeds_and_writes_every_file(run):
    assert run["code"] == 0, [r.get("error") for r in run["doc"]["results"]]
    for name in ("results.json", "results.md", "results.png"):
        assert (run["out"] / name).is_file() and (run["out"] / name).stat().st_size > 0, name
    assert (run["out"] / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json_validates_against_the_schema(run):
    import jsonschema
    schema = json.loads(render.SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(run["doc"], schema, cls=jsonschema.Draft202012Validator)
    assert render.schema_problems(run["doc"]) == []


def test_schema_rejects_a_broken_document(run):
    broken = copy.deepcopy(run["doc"])
    del broken["results"][0]["ttft_s"]
    broken["results"][1]["drift"]["top1_agreement"] = 1.5
    problems = render.schema_problems(broken)
    assert len(problems) >= 2


def test_every_requested_setting_ran(run):
    ids = set(run["by_id"])
    assert {"cpu/float32/none", "cpu/float32/int8", "torch-eager@cpu/float32"} <= ids
    if machine._transformers_version() is not None:
        assert "transformers@cpu/float32" in ids
    else:
        assert any("transformers" in s["setting"] for s in run["doc"]["skipped"])
    assert all(r["status"] == "ok" for r in run["doc"]["results"])


def test_unavailable_backend_is_skipped_with_its_reason(run):
    if run["unavailable"] is None:
        pytest.skip("every backend is available on this machine")
    row = next(s for s in run["doc"]["skipped"] if run["unavailable"] in s["setting"])
    reason = next(r["reason"] for r in glmrt.list_backends() if r["name"] == run["unavailable"])
    assert row["reason"] == reason and reason
    assert not any(r["backend"] == run["unavailable"] for r in run["doc"]["results"])


def test_stamp_names_hardware_software_and_command(run):
    doc = run["doc"]
    assert doc["hardware"]["cpu"]["model"] and doc["hardware"]["threads"] == 2
    assert doc["software"]["torch"] == torch.__version__
    assert doc["software"]["glmrt"] == glmrt.__version__
    assert doc["software"]["commit"] == "unknown" or len(doc["software"]["commit"]) == 40
    assert doc["command"].startswith("glmrt bench ") and "--quantize none,int8" in doc["command"]
    assert doc["config"]["prompt_len"] == PROMPT_LEN and doc["config"]["gen_len"] == GEN_LEN
    assert len(doc["prompt_ids"]) == 1 and len(doc["prompt_ids"][0]) == PROMPT_LEN
    assert doc["device_bandwidth"]["cpu"]["kind"] == "measured-read"
    assert doc["device_bandwidth"]["cpu"]["bytes_per_s"] > 0
    assert all(r["torch_threads"] == 2 for r in doc["results"])


def test_metrics_are_positive_and_consistent(run):
    batch = run["doc"]["config"]["batch"]
    device_bw = run["doc"]["device_bandwidth"]["cpu"]["bytes_per_s"]
    for r in run["doc"]["results"]:
        where = r["id"]
        ttft, tpot = r["ttft_s"]["median"], r["tpot_s"]["mean"]
        assert ttft > 0 and tpot > 0, where
        assert r["decode_tokens_per_s"]["mean"] == pytest.approx(batch / tpot, rel=1e-9), where
        assert r["prefill_tokens_per_s"]["median"] == pytest.approx(batch * PROMPT_LEN / ttft, rel=1e-9), where
        e2e = r["e2e_s"]["median"]
        assert e2e > ttft and (e2e - ttft) / (GEN_LEN - 1) == pytest.approx(tpot, rel=1e-9), where
        assert 0 < r["tpot_s"]["p50"] <= r["tpot_s"]["p90"], where
        for s in (r["ttft_s"], r["e2e_s"], r["decode_tokens_per_s"], r["tpot_s"]["per_run"]):
            assert s["min"] <= s["median"] <= s["max"] and len(s["values"]) == 1, where
        bw = r["bandwidth"]
        assert bw["bytes_per_step"] == bw["weight_bytes_per_step"] + bw["kv_bytes_per_step"], where
        assert bw["achieved_bytes_per_s"] == pytest.approx(bw["bytes_per_step"] / tpot, rel=1e-9), where
        assert bw["fraction_of_device"] == pytest.approx(bw["achieved_bytes_per_s"] / device_bw, rel=1e-9), where
        assert bw["mean_context"] == PROMPT_LEN + GEN_LEN / 2
        assert r["weight_bytes"] > 0 and r["peak_memory"]["bytes"] > r["weight_bytes"], where
        assert len(r["generated_ids"]) == GEN_LEN and all(len(t) == batch for t in r["generated_ids"]), where
        assert r["full_depth"] is None  # the whole (2-layer) model ran


def test_bytes_read_per_step_match_the_weights(run):
    fp32, int8 = run["by_id"]["cpu/float32/none"], run["by_id"]["cpu/float32/int8"]
    embedding = VOCAB * HIDDEN * 4
    # Every fp32 weight is read once per step except the embedding table: one row per sequence.
    assert fp32["bandwidth"]["weight_bytes_per_step"] == fp32["weight_bytes"] - embedding + HIDDEN * 4
    kv = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4 * (PROMPT_LEN + GEN_LEN / 2)
    assert fp32["bandwidth"]["kv_bytes_per_step"] == kv
    assert int8["weight_bytes"] < fp32["weight_bytes"]
    assert int8["bandwidth"]["bytes_per_step"] < fp32["bandwidth"]["bytes_per_step"]
    baseline = run["by_id"]["torch-eager@cpu/float32"]
    assert baseline["weight_bytes"] == fp32["weight_bytes"]
    assert baseline["bandwidth"]["bytes_per_step"] == fp32["bandwidth"]["bytes_per_step"]


def test_drift_against_the_fp32_reference(run):
    fp32 = run["by_id"]["cpu/float32/none"]["drift"]
    assert fp32["positions"] == PROMPT_LEN
    assert fp32["max_abs_logit_diff"] < 1e-4 and fp32["top1_agreement"] == 1.0 and fp32["mean_kl"] < 1e-9
    int8 = run["by_id"]["cpu/float32/int8"]["drift"]
    assert 0 < int8["max_abs_logit_diff"] < 1.0 and int8["mean_kl"] > fp32["mean_kl"]
    # The baselines are the same model built independently: fp32 drift ~0 checks their weight mapping.
    for rid in ("torch-eager@cpu/float32", "transformers@cpu/float32"):
        if rid in run["by_id"]:
            drift = run["by_id"][rid]["drift"]
            assert drift["max_abs_logit_diff"] < 1e-4 and drift["top1_agreement"] == 1.0, rid


def test_baselines_generate_what_glmrt_generates(run):
    want = run["by_id"]["cpu/float32/none"]["generated_ids"]
    for rid in ("torch-eager@cpu/float32", "transformers@cpu/float32"):
        if rid in run["by_id"]:
            assert run["by_id"][rid]["generated_ids"] == want, rid
            assert run["by_id"][rid]["label"] and run["by_id"][rid]["runner"] in baselines.BASELINES


def test_markdown_has_table_stamp_and_definitions(run):
    text = (run["out"] / "results.md").read_text()
    assert run["doc"]["command"] in text
    assert "| setting | TTFT ms | TPOT ms mean |" in text
    for rid in run["by_id"]:
        assert f"| {rid} |" in text
    assert run["doc"]["hardware"]["cpu"]["model"] in text and "## Definitions" in text


def test_compare_prints_matching_settings_and_ratios(run, tmp_path, capsys):
    a_path = run["out"] / "results.json"
    b_doc = copy.deepcopy(run["doc"])
    for r in b_doc["results"]:
        r["decode_tokens_per_s"]["mean"] *= 2
    b_doc["results"].append(dict(b_doc["results"][0], id="cuda/bfloat16/none"))
    b_path = tmp_path / "b.json"
    b_path.write_text(json.dumps(b_doc))
    assert bench.main(["--compare", str(a_path), str(b_path)]) == 0
    text = capsys.readouterr().out
    assert "2.00x" in text and "1.00x" in text
    assert "cuda/bfloat16/none (only in B)" in text
    for rid in run["by_id"]:
        assert rid in text


def test_cli_hook(run, monkeypatch, capsys):
    from glmrt import cli
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("glmrt.bench",))
    path = str(run["out"] / "results.json")
    assert cli.main(["bench", "--compare", path, path]) == 0
    assert "1.00x" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--backends" in capsys.readouterr().out


def test_a_relative_checkpoint_directory_runs(tiny_ckpt, tmp_path, monkeypatch):
    """The workers start in their own directory: a path relative to the caller's must reach them resolved."""
    monkeypatch.chdir(tiny_ckpt.parent)
    out = tmp_path / "out"
    argv = [tiny_ckpt.name, "--backends", "cpu", "--quantize", "none", "--baseline", "none", "--repeat", "1",
            "--warmup", "0", "--prompt-len", "4", "--gen-len", "2", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in doc["results"]] == ["ok"], [r.get("error") for r in doc["results"]]
    assert doc["model"]["source"] == tiny_ckpt.name  # recorded as given


# ------------------------------------------------------------------------------------------------
# errors and helpers (no worker processes)


def test_help_names_only_files_of_the_repository(capsys):
    """`glmrt bench --help` once sent readers to ../shared/PERF.md, a file outside the repository."""
    root = Path(__file__).resolve().parents[2]
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "../" not in text
    named = re.findall(r"[\w.-]+/[\w./-]+\.(?:md|json|py|sh)\b", text)  # paths, not A.json
    assert named, "the help names where the metrics are defined"
    for path in named:
        assert (root / path).is_file(), path


@pytest.mark.parametrize("argv, message", [
    ([], "needs a model"),
    (["synthetic:chatglm3-6b", "--backends", "tpu9"], "unknown backend 'tpu9'"),
    (["synthetic:chatglm3-6b", "--gen-len", "1"], "--gen-len must be at least 2"),
    (["synthetic:chatglm3-6b", "--dtype", "int8"], "unsupported dtype"),
    (["synthetic:chatglm3-6b", "--quantize", "int3"], "unknown quantization"),
    (["synthetic:chatglm3-6b", "--baseline", "vllm"], "unknown --baseline"),
    (["synthetic:no-such-model"], "unknown synthetic preset"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert "glmrt: error:" in err and message in err and "Traceback" not in err


def test_compare_refuses_a_file_that_is_not_a_bench_result(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text("{}")
    assert bench.main(["--compare", str(other), str(other)]) == 2
    assert "not a glmrt bench results.json" in capsys.readouterr().err


def test_percentile_matches_linear_interpolation():
    values = [4.0, 1.0, 3.0, 2.0]
    assert metrics.percentile(values, 50) == 2.5
    assert metrics.percentile(values, 90) == pytest.approx(3.7)
    assert metrics.percentile([5.0], 90) == 5.0


def test_published_bandwidth_matches_device_names():
    assert machine.published_bandwidth("NVIDIA H100 80GB HBM3")["bytes_per_s"] == 3.35e12
    assert machine.published_bandwidth("NVIDIA H200")["bytes_per_s"] == 4.8e12
    assert machine.published_bandwidth("NVIDIA A100-SXM4-80GB")["bytes_per_s"] == 2.04e12
    assert machine.published_bandwidth("NVIDIA H100 PCIe") is None
    assert machine.published_bandwidth("NVIDIA A100 80GB PCIe") is None
    assert machine.published_bandwidth("NVIDIA GeForce RTX 4090") is None


def test_logit_drift_of_identical_and_shifted_logits():
    ref = torch.randn(1, 5, 11, generator=torch.Generator().manual_seed(0))
    same = metrics.logit_drift(ref.clone(), ref)
    assert same == {"max_abs_logit_diff": 0.0, "top1_agreement": 1.0, "mean_kl": 0.0, "positions": 5}
    shifted = metrics.logit_drift(ref + 3.0, ref)  # a constant shift changes no probability
    assert shifted["max_abs_logit_diff"] == pytest.approx(3.0) and shifted["mean_kl"] < 1e-12
    flipped = metrics.logit_drift(-ref, ref)
    assert flipped["top1_agreement"] == 0.0 and flipped["mean_kl"] > 0.1


def test_full_depth_estimate_scales_by_bytes():
    traffic = {"bytes_per_step": 1000.0, "num_layers": 2, "layer_weight_bytes": 300, "kv_bytes_per_token_per_layer": 1,
               "mean_context": 50.0}
    est = metrics.full_depth_estimate(traffic, tpot_mean=0.01, batch=1, full_layers=4)
    # per layer: 300 + 50 bytes; fixed: 1000 - 2 * 350 = 300; full: 300 + 4 * 350 = 1700.
    assert est["bytes_per_step_full"] == 1700
    assert est["tpot_s_full"] == pytest.approx(0.017) and est["per_layer_tpot_s"] == pytest.approx(0.0035)
    assert metrics.full_depth_estimate(traffic, 0.01, 1, full_layers=2) is None


def test_summarize_timings_from_token_times():
    runs = [metrics.RunTiming([0.5, 0.6, 0.8, 0.9]), metrics.RunTiming([0.4, 0.5, 0.6, 0.7])]
    s = metrics.summarize_timings(runs, batch=2, prompt_len=8)
    assert s["ttft_s"]["values"] == [0.5, 0.4]
    assert s["tpot_s"]["per_run"]["values"] == pytest.approx([0.4 / 3, 0.1])
    assert s["tpot_s"]["mean"] == pytest.approx((0.4 / 3 + 0.1) / 2)
    assert s["decode_tokens_per_s"]["mean"] == pytest.approx(2 / s["tpot_s"]["mean"])
    assert s["prefill_tokens_per_s"]["values"] == pytest.approx([32.0, 40.0])
    assert s["tpot_s"]["p50"] == pytest.approx(0.1)


class _Allocated(Exception):
    pass


@pytest.mark.parametrize("cache_mib", [480, 32, None])
def test_the_cpu_read_probe_is_sized_from_the_caches_and_bounded(cache_mib, monkeypatch):
    """The probe's buffer was max(1 GiB, 16 x the last-level cache): 7.5 GiB on a machine that reports
    a 480 MiB L3, whatever the model. It is a few times the caches (STREAM's rule), within bounds."""
    asked = []

    def ones(n, **kwargs):
        asked.append(n * 4)
        raise _Allocated

    monkeypatch.setattr(machine, "last_level_cache_bytes", lambda *a, **k: None if cache_mib is None else cache_mib << 20)
    monkeypatch.setattr(torch, "ones", ones)
    with pytest.raises(_Allocated):
        machine.cpu_read_bandwidth(1, repeats=1)
    size = asked[0]
    assert size <= 2 << 30
    if cache_mib is not None:
        assert size >= min(4 * (cache_mib << 20), 2 << 30)


def test_last_level_caches_are_summed_over_their_instances(tmp_path):
    """Two sockets, each with its own 32 MiB L3 (shared by its CPUs), read from a sysfs-shaped tree."""
    for cpu in range(4):
        for index, (level, kind, size, shared) in enumerate((
                (1, "Data", "48K", str(cpu)), (2, "Unified", "2048K", str(cpu)),
                (3, "Unified", "32768K", "0-1" if cpu < 2 else "2-3"))):
            d = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
            d.mkdir(parents=True)
            for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
                (d / name).write_text(f"{value}\n")
    assert machine.last_level_cache_bytes(tmp_path) == 2 * (32 << 20)


def test_an_installed_copy_reports_the_commit_it_was_built_from(tmp_path):
    from glmrt.bench.machine import git_commit
    package = tmp_path / "site-packages" / "glmrt"
    package.mkdir(parents=True)
    assert git_commit(package) == {"commit": "unknown", "dirty": None}  # no checkout, no build info
    (package / "_build_info.json").write_text('{"commit": "' + "ab" * 20 + '", "dirty": false}')
    assert git_commit(package) == {"commit": "ab" * 20, "dirty": False}
    (package / "_build_info.json").write_text('{"commit": "not-a-sha", "dirty": true}')
    assert git_commit(package)["commit"] == "unknown"
