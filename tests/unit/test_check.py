"""`glmrt check` (glmrt.conformance): the sweep, the comparisons, the table, the exit status.

Backends here are small Backend subclasses built in the test, with kernels that are right, a bit
wrong, or broken in the ways ports go wrong, to show the kit tells them apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from glmrt import conformance, ops
from glmrt.backends.base import NATIVE, VENDOR, Backend, Capabilities, Kernel, ProbeResult, Verification

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def cases():
    return conformance.build_cases(DTYPES)


class FakeBackend(Backend):
    device_type = "cpu"

    def __init__(self, name, kernels, dtypes=DTYPES):
        self.name = name
        self._kernels = kernels
        self._dtypes = dtypes

    def probe(self):
        return ProbeResult(True, "test backend")

    def verification(self):
        return Verification("unverified", "test backend")

    def capabilities(self):
        return Capabilities(dtypes=self._dtypes)

    def kernels(self):
        return self._kernels


def rows_by_kernel(rows):
    return {r.kernel: r for r in rows}


def check_command() -> list[str]:
    """`glmrt check`, or the module itself until the command is registered in glmrt.cli."""
    from glmrt import cli
    if "glmrt.conformance" in cli._COMMAND_MODULES:
        return [sys.executable, "-m", "glmrt", "check"]
    return [sys.executable, "-m", "glmrt.conformance"]


# ----------------------------------------------------------------------------- the sweep
def test_sweep_covers_every_op_dtype_and_weight_format(cases):
    from glmrt.graph import OPS
    from glmrt.shard import COLLECTIVE_OPS  # run on the process group (ops.COLLECTIVES), not on kernels
    assert {c.node.op for c in cases} == set(OPS) - set(COLLECTIVE_OPS)
    assert any("vocab_start" in c.node.attrs for c in cases if c.node.op == "embedding")  # vocab-parallel
    assert {c.node.input_specs[0].dtype for c in cases if c.node.op == "linear"} == set(DTYPES)
    formats = {(c.node.attrs["quant"]["bits"], c.node.attrs["quant"]["group_size"])
               for c in cases if "quant" in c.node.attrs}
    assert formats == set(conformance.QUANT_FORMATS)
    norms = {(c.node.attrs["kind"], c.node.attrs["round_before_weight"]) for c in cases if c.node.op == "norm"}
    assert {("rmsnorm", False), ("rmsnorm", True), ("layernorm", False)} <= norms
    assert {c.node.attrs["kind"] for c in cases if c.node.op == "rope"} == {"interleaved", "half", "2d"}
    widths = {c.node.input_specs[0].shape[-1] for c in cases if c.node.op == "linear"}
    assert {37, 45, 515, 4100} <= widths  # odd K, K past a 256-wide slice, a hidden size past 4096
    attention = [c for c in cases if c.node.op == "attention"]
    assert any(c.make_ctx(torch.device("cpu")).cache is not None for c in attention)
    assert any(c.compare_rows is not None and not bool(c.compare_rows.all()) for c in attention)  # padded rows


def test_reference_kernels_pass(cases):
    backend = FakeBackend("ref", [Kernel(op, f"ref.{op}", VENDOR, fn) for op, fn in ops.REFERENCE.items()])
    rows = conformance.check_kernels(backend, cases)
    assert all(r.status == "pass" and r.cases > 0 for r in rows), [r.to_dict() for r in rows if r.status != "pass"]
    assert sum(r.cases for r in rows) == len(cases)


# ----------------------------------------------------------------------------- catching wrong kernels
def _linear_off_by(relative):
    def fn(ctx, node, inputs, params):
        out = ops.linear(ctx, node, inputs, params)
        return out + relative * out.abs().max()
    return fn


def test_a_kernel_slightly_off_fails_and_one_within_rounding_passes(cases):
    rows = rows_by_kernel(conformance.check_kernels(FakeBackend("x", [
        Kernel("linear", "off-by-5e-2", NATIVE, _linear_off_by(5e-2)),
        Kernel("linear", "off-by-1e-6", NATIVE, _linear_off_by(1e-6)),
    ]), cases))
    assert rows["off-by-5e-2"].status == "FAIL" and "tolerance" in rows["off-by-5e-2"].detail
    assert rows["off-by-1e-6"].status == "pass"


def test_broken_kernels_are_reported_not_raised(cases):
    def raises(ctx, node, inputs, params):
        raise RuntimeError("device lost")

    def wrong_dtype(ctx, node, inputs, params):
        return ops.norm(ctx, node, inputs, params).float()

    def nan(ctx, node, inputs, params):
        out = ops.activation(ctx, node, inputs, params)
        out.view(-1)[0] = float("nan")
        return out

    def bad_predicate(node):
        raise KeyError("attrs")

    rows = rows_by_kernel(conformance.check_kernels(FakeBackend("x", [
        Kernel("embedding", "raises", NATIVE, raises),
        Kernel("norm", "wrong-dtype", NATIVE, wrong_dtype),
        Kernel("activation", "nan", NATIVE, nan),
        Kernel("residual", "bad-predicate", NATIVE, ops.residual, bad_predicate),
    ], dtypes=(torch.bfloat16,)), [c for c in cases if c.node.input_specs[-1].dtype in (torch.bfloat16, torch.int64)]))
    assert rows["raises"].status == "FAIL" and "device lost" in rows["raises"].detail
    assert rows["wrong-dtype"].status == "FAIL" and "torch.float32" in rows["wrong-dtype"].detail
    assert rows["nan"].status == "FAIL" and "NaN" in rows["nan"].detail
    assert rows["bad-predicate"].status == "FAIL" and "supports() raised" in rows["bad-predicate"].detail


def test_a_kernel_that_changes_its_inputs_does_not_corrupt_the_reference(cases):
    def in_place(ctx, node, inputs, params):
        res, branch = inputs
        branch.add_(res * node.attrs["alpha"])
        return branch

    rows = conformance.check_kernels(FakeBackend("x", [Kernel("residual", "in-place", NATIVE, in_place)]), cases)
    assert rows_by_kernel(rows)["in-place"].status == "pass"


def test_quantized_linear_tolerance_allows_int8_activations_but_not_wrong_scales(cases):
    """A kernel may round activations to int8 per block of 32 (llama.cpp); one that applies the
    first group's scale to every group is wrong, and fails."""
    from glmrt.quant import dequantize

    def int8_activations(ctx, node, inputs, params):
        x = inputs[0]
        k = x.shape[-1]
        blocks = -(-k // 32)
        xp = torch.nn.functional.pad(x.float(), (0, blocks * 32 - k)).unflatten(-1, (blocks, 32))
        d = xp.abs().amax(-1, keepdim=True) / 127
        xq = (torch.round(xp / d.clamp(min=1e-30)).clamp(-127, 127) * d).flatten(-2)[..., :k].to(x.dtype)
        return ops.linear(ctx, node, [xq], params)

    def first_group_scale_only(ctx, node, inputs, params):
        q = node.attrs["quant"]
        scale = params["scale"]
        if scale.dim() == 2:
            scale = scale[:, :1].expand_as(scale).contiguous()
        w = dequantize(params["weight"], scale, q["bits"], q["group_size"], q["in_features"], inputs[0].dtype)
        return torch.nn.functional.linear(inputs[0], w, params.get("bias"))

    quantized = [c for c in cases if "quant" in c.node.attrs]
    rows = rows_by_kernel(conformance.check_kernels(FakeBackend("x", [
        Kernel("linear", "int8-activations", NATIVE, int8_activations),
        Kernel("linear", "first-group-scale", NATIVE, first_group_scale_only,
               lambda node: None if node.attrs.get("quant") else "float weights"),
    ]), quantized))
    assert rows["int8-activations"].status == "pass", rows["int8-activations"].detail
    assert rows["first-group-scale"].status == "FAIL"


def test_padded_attention_rows_need_only_be_finite(cases):
    def zero_masked_rows(ctx, node, inputs, params):
        out = ops.attention(ctx, node, inputs, params)
        seen = ctx.allowed[:, 0].any(-1)  # (B, T)
        return torch.where(seen[..., None], out, torch.zeros_like(out))

    def nan_masked_rows(ctx, node, inputs, params):
        out = ops.attention(ctx, node, inputs, params)
        seen = ctx.allowed[:, 0].any(-1)
        return torch.where(seen[..., None], out, torch.full_like(out, float("nan")))

    rows = rows_by_kernel(conformance.check_kernels(FakeBackend("x", [
        Kernel("attention", "zeros", NATIVE, zero_masked_rows),
        Kernel("attention", "nans", NATIVE, nan_masked_rows),
    ]), [c for c in cases if c.node.op == "attention"]))
    assert rows["zeros"].status == "pass"
    assert rows["nans"].status == "FAIL" and "finite" in rows["nans"].detail


# ----------------------------------------------------------------------------- fallbacks and strict
def test_fallbacks_are_listed_and_strict_fails_them(cases):
    def plain_residual_only(node):
        return None if node.attrs["alpha"] == 1.0 else "alpha != 1"

    backend = FakeBackend("x", [Kernel("residual", "add", NATIVE, ops.residual, plain_residual_only)])
    rows = conformance.check_kernels(backend, cases)
    fallbacks = {r.op: r for r in rows if r.status == "fallback"}
    assert set(fallbacks) == {"embedding", "norm", "linear", "rope", "attention", "activation", "lm_head",
                              "residual", "residual_norm"}
    assert "alpha != 1" in fallbacks["residual"].detail and "no kernel for 'linear'" in fallbacks["linear"].detail
    strict = conformance.check_kernels(backend, cases, strict=True)
    assert {r.op for r in strict if r.status == "FAIL"} == set(fallbacks)


# ----------------------------------------------------------------------------- the command
def write_tiny_glm_checkpoint(directory: Path) -> Path:
    """A transformers-format `glm` checkpoint (GlmForCausalLM names): hidden 64, 2 layers, fp32."""
    vocab, hidden, ffn, layers, heads, kv_heads, head_dim = 256, 64, 96, 2, 4, 2, 16
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu", "attention_bias": True,
        "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 128,
        "tie_word_embeddings": False, "eos_token_id": [2, 3], "pad_token_id": 0, "torch_dtype": "float32"}))
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (0.1 * torch.randn(*shape, generator=gen)).contiguous()

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": 1 + rand(hidden),
               "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = 1 + rand(hidden)
        tensors[f"{p}.post_attention_layernorm.weight"] = 1 + rand(hidden)
        for name, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            tensors[f"{p}.self_attn.{name}_proj.weight"] = rand(rows, hidden)
            tensors[f"{p}.self_attn.{name}_proj.bias"] = rand(rows)
        tensors[f"{p}.self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        tensors[f"{p}.mlp.gate_up_proj.weight"] = rand(2 * ffn, hidden)
        tensors[f"{p}.mlp.down_proj.weight"] = rand(hidden, ffn)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_glm_checkpoint(tmp_path_factory.mktemp("tiny_glm"))


def run_check(*args, timeout=600):
    return subprocess.run(check_command() + list(args), capture_output=True, text=True, timeout=timeout)


def test_check_cpu_on_a_checkpoint_prints_the_table(tiny_ckpt):
    proc = run_check("--backend", "cpu", "--model", str(tiny_ckpt))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("op "))
    for column in ("op", "kernel", "cases", "max error", "tolerance", "status"):
        assert column in header
    assert any(line.startswith("model") and "logits" in line and line.rstrip().endswith("pass") for line in lines)
    assert any("greedy 8 tokens" in line for line in lines)
    assert lines[-1].startswith("PASS")


def test_check_json_with_quantized_model(tiny_ckpt):
    proc = run_check("--backend", "cpu", "--model", str(tiny_ckpt), "--quantize", "int4-g32", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["passed"] and result["backend"] == "cpu" and result["cases"] > 500
    assert {r["status"] for r in result["kernels"]} <= {"pass", "skip"}
    assert [r["kernel"] for r in result["model"]] == ["plan", "logits", "greedy 8 tokens"]
    assert "int4-g32" in result["model"][0]["detail"]


def test_check_exit_status_on_bad_arguments():
    proc = run_check("--backend", "tpu9", "--no-model")
    assert proc.returncode == 2 and "unknown backend 'tpu9'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_check("--backend", "cpu", "--no-model", "--dtype", "float64")
    assert proc.returncode == 2 and "float64" in proc.stderr


def test_check_is_a_glmrt_subcommand():
    from glmrt import cli
    if "glmrt.conformance" not in cli._COMMAND_MODULES:
        pytest.skip("glmrt.conformance is not yet in glmrt.cli._COMMAND_MODULES")
    proc = subprocess.run([sys.executable, "-m", "glmrt", "check", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--strict" in proc.stdout and "--backend" in proc.stdout


def test_no_kernels_checks_the_model_only_and_both_flags_are_refused(tiny_ckpt):
    proc = run_check("--backend", "cpu", "--model", str(tiny_ckpt), "--no-kernels", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["kernels"] == [] and result["cases"] == 0 and result["passed"]
    assert [r["kernel"] for r in result["model"]] == ["plan", "logits", "greedy 8 tokens"]
    proc = run_check("--backend", "cpu", "--no-kernels", "--no-model")
    assert proc.returncode == 2 and "nothing to check" in proc.stderr


def test_prompts_follow_each_generations_input_format():
    from glmrt.models import PRESETS, config_from_dict
    for name in ("chatglm-6b", "glm-130b", "chatglm3-6b"):
        _, cfg = config_from_dict(dict(PRESETS[name]))
        ids, mask = conformance._prompt(cfg)
        assert ids.shape == mask.shape == (2, 8) and mask[1, :3].sum() == 0 and mask[0].all()
        if cfg.mask_kind == "prefix":  # GLM-130B, ChatGLM-6B: text + [gMASK] <sop>
            assert ids[:, -2:].tolist() == [[cfg.gmask_token_id, cfg.sop_token_id]] * 2
            text = ids[:, :-2][mask[:, :-2].bool()]
            assert int(text.max()) < min(cfg.gmask_token_id, cfg.sop_token_id)
