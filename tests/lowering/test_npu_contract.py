"""Contract tests of the npu (Ascend / torch_npu) backend, without Ascend hardware.

The torch_npu test double (tests/npu_double/torch_npu.py) is loaded from its file and
monkeypatched in as ``sys.modules["torch_npu"]`` for each test, so the backend's own
``import torch_npu`` gets it; nothing else in the process, and nothing installed, can import it.
The backend runs on the CPU (NPUBackend(device="cpu")). The double implements the documented
semantics of each op and raises where the real op would refuse its arguments, so a kernel that
passes here calls torch_npu with the documented signatures, layouts and dtypes. Checked:
  (a) which vendor op each node of each GLM generation lowers to on each Ascend product, and why
      others fall back;
  (b) every vendor kernel against the reference op in glmrt.ops;
  (c) whole tiny models, prefill and KV-cache decode, fp32/bf16/fp16, INT8/INT4, causal and
      prefix masks: the npu plan's logits against the plain-torch reference plan's on the CPU.
"""

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from glmrt import cli, ops
from glmrt._bootstrap import probe_torch_npu
from glmrt.api import synthetic_weights
from glmrt.backends import get_backend
from glmrt.backends.base import REFERENCE, VENDOR, Backend, ProbeResult, Verification
from glmrt.backends.npu import NPUBackend
from glmrt.backends.npu import kernels as npu_kernels
from glmrt.errors import StrictFallbackError
from glmrt.fusion import RESIDUAL_NORM, backend_accepts, fuse_residual_norm, fused_nodes
from glmrt.graph import Node, ValueSpec, build_graph
from glmrt.lowering import execute, lower
from glmrt.models import PRESETS, config_from_dict
from glmrt.ops import ForwardContext, KVCache
from glmrt.quant import quantize_graph, quantize_weights, quantize_weight, unpack_int4

CPU = torch.device("cpu")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DOUBLE_FILE = Path(__file__).resolve().parents[1] / "npu_double" / "torch_npu.py"


def _load_double():
    """The double as a module object of its own, registered nowhere (the fixture installs it)."""
    spec = importlib.util.spec_from_file_location("torch_npu", DOUBLE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


double = _load_double()


@pytest.fixture(autouse=True)
def torch_npu_double(monkeypatch):
    probe_torch_npu()  # this machine's real answer, cached before the double is installed
    monkeypatch.setitem(sys.modules, "torch_npu", double)
    monkeypatch.setattr(double.npu, "device_name", "Ascend910B3")
    double.reset()
    yield double


def npu(**kw) -> NPUBackend:
    return NPUBackend(device="cpu", **kw)


def tiny(preset: str, **over):
    """A preset's semantics at tiny widths: 2 layers, 4 heads of the real head_dim 128 (so the
    64-of-128 rotary and the vendor ops' head-dim limits are the real ones), GQA kept as 4:2."""
    _, cfg = config_from_dict(dict(PRESETS[preset]))
    gqa = cfg.num_kv_heads < cfg.num_heads
    base = dict(num_layers=2, hidden_size=512, num_heads=4, num_kv_heads=2 if gqa else 4, head_dim=128,
                ffn_hidden_size=256, vocab_size=256, max_positions=128)
    if cfg.rotary_dim == cfg.head_dim:
        base["rotary_dim"] = 128
    return cfg.replace(**{**base, **over})


def meta_weights(graph):
    return {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in graph.params.items()}


def plan_of(cfg, dtype, backend=None, quant=None, fuse=False, **kw):
    graph = build_graph(cfg, dtype)
    if quant is not None:
        graph = quantize_graph(graph, *quant)
    backend = backend or npu()
    if fuse:  # as glmrt.load fuses for this backend
        graph = fuse_residual_norm(graph, backend_accepts(backend))
    return lower(graph, backend, meta_weights(graph), **kw)


def step(plan, name_suffix=None, op=None):
    return next(s for s in plan.steps if (op is None or s.node.op == op)
                and (name_suffix is None or s.node.name.endswith(name_suffix)))


def node_of(cfg, op, dtype, quant=None, suffix=None):
    return step(plan_of(cfg, dtype, quant=quant), suffix, op).node


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


# ============================================================================ (a) lowering
def test_registry_and_honest_description():
    assert isinstance(get_backend("ascend"), NPUBackend)
    backend = NPUBackend()
    d = backend.describe()
    assert d["name"] == "npu" and d["device_type"] == "npu"
    assert d["verification"]["level"] == "contract-verified"
    assert "no Ascend hardware" in d["verification"]["detail"]
    assert d["capabilities"]["collective_backend"] == "hccl" and d["capabilities"]["graph_capture"]
    assert set(d["capabilities"]["quant_formats"]) == {"int8", "int4"}
    assert set(d["capabilities"]["dtypes"]) == {"float32", "bfloat16", "float16"}
    # The probe is this machine's (a subprocess), never the double's: without torch_npu (or
    # CANN) the backend is unavailable and says why.
    assert (d["available"], d["reason"]) == probe_torch_npu()
    if not d["available"]:
        assert "torch_npu" in d["reason"]
    # The module the kernels would call is named, so a stand-in cannot pass for torch_npu.
    assert d["native"]["torch_npu"].startswith("2.13.0+double from ") and str(DOUBLE_FILE) in d["native"]["torch_npu"]
    assert d["native"]["product"] == "Ascend910B3 (Atlas A2 (Ascend 910B))"
    assert npu().device() == CPU


def test_fused_attention_mask_polarity_is_marked_unverified_with_its_check(capsys):
    """True = masked is documented for npu_incre_flash_attention / npu_fusion_attention, not for
    npu_fused_infer_attention_score: the verification text says so and gives the check to run on
    the device. The check itself runs here against the double (which implements True = masked)."""
    detail = NPUBackend().verification().detail
    assert "UNVERIFIED: the attention mask polarity of npu_fused_infer_attention_score" in detail
    check = npu_kernels.FIA_MASK_POLARITY_CHECK
    assert check in detail and check.startswith('python -c "') and "\n" not in check
    code = check[len('python -c "'):-1].replace("d='npu'", "d='cpu'")
    exec(compile(code, "<polarity check>", "exec"), {})  # imports torch_npu: the double, here
    assert capsys.readouterr().out.startswith("[1.0, 1.0] 1.0: True masks")


def test_glmrt_info_is_honest_while_the_double_stands_in(capsys):
    assert cli.main(["info", "--backend", "npu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    row = next(r for r in out["backends"] if r["name"] == "npu")
    assert (row["available"], row["reason"]) == probe_torch_npu()
    assert out["backend"]["verification"]["level"] == "contract-verified"
    assert "+double" in out["backend"]["native"]["torch_npu"]


def test_plans_for_absent_hardware_assume_the_documented_a2_and_say_so(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu")
    if probe_torch_npu()[0]:
        pytest.skip("a working torch_npu is installed here")
    backend = NPUBackend()
    assert backend.product().assumed and backend.product().family == npu_kernels.A2
    native = backend.native_info()
    assert "assumed: no device to ask" in native["product"] and native["torch_npu"].startswith("not imported")
    plan = plan_of(tiny("chatglm3-6b"), BF16, backend, strict=True)  # built without importing torch_npu
    assert step(plan, op="rope").impl == "torch_npu.npu_rotary_mul"
    assert "torch_npu" not in sys.modules


def test_product_is_read_from_the_device(torch_npu_double):
    torch_npu_double.npu.device_name = "Ascend910A"
    backend = npu()
    assert backend.product() == npu_kernels.Product("Ascend910A", npu_kernels.TRAINING_910, False)
    assert step(plan_of(tiny("chatglm3-6b"), BF16, backend), op="attention").kind == REFERENCE


@pytest.mark.parametrize("soc,family", [("Ascend910B3", npu_kernels.A2), ("Ascend910_9392", npu_kernels.A3),
                                        ("Ascend910A", npu_kernels.TRAINING_910),
                                        ("Ascend910ProB", npu_kernels.TRAINING_910),
                                        ("Ascend310P3", npu_kernels.INFERENCE), ("Ascend950PR", npu_kernels.UNKNOWN)])
def test_product_families(soc, family):
    assert npu_kernels.product_family(soc) == family


def test_glm4_style_model_lowers_every_op_to_torch_npu_in_bf16():
    plan = plan_of(tiny("chatglm3-6b"), BF16, strict=True)  # strict: nothing falls back
    impl = {s.node.op: s.impl for s in plan.steps if not s.node.name.endswith("dense")}
    assert impl == {"embedding": "torch-npu.embedding", "norm": "torch_npu.npu_rms_norm",
                    "linear": "torch-npu.linear", "rope": "torch_npu.npu_rotary_mul",
                    "attention": "torch_npu.npu_fused_infer_attention_score",
                    "activation": "torch_npu.npu_swiglu", "residual": "torch-npu.residual",
                    "lm_head": "torch-npu.lm_head"}


def test_partial_interleaved_rope_never_takes_a_full_head_op():
    """GLM's rotary: interleaved pairs on dims 0-63 of 128. npu_apply_rotary_pos_emb (half-split,
    full head) must refuse it by name; npu_rotary_mul takes it on the slice in 'interleave' mode."""
    rope = step(plan_of(tiny("chatglm3-6b"), BF16), op="rope")
    assert rope.impl == "torch_npu.npu_rotary_mul"
    assert "npu_apply_rotary_pos_emb" in rope.reason and "interleaved" in rope.reason
    assert "64 of 128" in rope.reason
    # Where 'interleave' mode does not exist (the original 910), it falls back; no full-head op.
    rope = step(plan_of(tiny("chatglm3-6b"), FP16, npu(soc="Ascend910A")), op="rope")
    assert rope.kind == REFERENCE
    assert "interleaved" in rope.reason and "'interleave' exists only on the aclnn path" in rope.reason


def test_fp32_attention_falls_back_with_reason_and_strict_refuses():
    plan = plan_of(tiny("chatglm3-6b"), FP32)
    attn = step(plan, op="attention")
    assert attn.kind == REFERENCE and "float16/bfloat16" in attn.reason
    assert step(plan, op="norm").impl == "torch_npu.npu_rms_norm"
    with pytest.raises(StrictFallbackError, match="attention"):
        plan_of(tiny("chatglm3-6b"), FP32, strict=True)


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_transformers_rmsnorm_rounding_refused_in_half_precision_only(dtype):
    cfg = tiny("glm-4-9b-0414")
    assert cfg.rmsnorm_round_before_weight
    norm = step(plan_of(cfg, dtype), op="norm")
    assert norm.kind == REFERENCE and "rounds once" in norm.reason and "before the weight" in norm.reason
    assert step(plan_of(cfg, FP32), op="norm").impl == "torch_npu.npu_rms_norm"


@pytest.mark.parametrize("preset", ["glm-130b", "chatglm-6b"])
def test_first_generation_models_fall_back_where_no_op_expresses_them(preset):
    plan = plan_of(tiny(preset), FP16)
    assert step(plan, op="rope").impl == "torch_npu.npu_apply_rotary_pos_emb"
    attn, act, norm = step(plan, op="attention"), step(plan, op="activation"), step(plan, op="norm")
    assert attn.kind == REFERENCE and "layer_scaled" in attn.reason
    assert act.kind == REFERENCE and "npu_swiglu" in act.reason
    assert norm.kind == REFERENCE and "layernorm" in norm.reason


def test_original_910_runs_only_what_its_products_table_allows():
    old = npu(soc="Ascend910A")
    glm130 = plan_of(tiny("glm-130b", attention_scaling="standard"), FP16, old)
    assert step(glm130, op="rope").impl == "torch_npu.npu_rotary_mul"  # 'half', D = 128
    assert "not documented for Ascend910A" in step(glm130, op="rope").reason
    assert step(glm130, op="attention").kind == REFERENCE
    chatglm6b = plan_of(tiny("chatglm-6b"), FP16, old)
    assert step(chatglm6b, op="rope").kind == REFERENCE  # 2-D RoPE halves are 64 wide: needs D = 128
    chatglm3 = plan_of(tiny("chatglm3-6b"), FP16, old)
    assert step(chatglm3, op="norm").impl == "torch_npu.npu_rms_norm"
    assert step(chatglm3, op="activation").kind == REFERENCE
    assert step(chatglm3, op="attention").kind == REFERENCE
    norm = step(plan_of(tiny("chatglm3-6b"), BF16, old), op="norm")  # no bfloat16 below the A2
    assert norm.kind == REFERENCE and "takes no bfloat16 on Ascend910A" in norm.reason


@pytest.mark.parametrize("soc,bf16", [("Ascend910B3", True), ("Ascend910_9392", True), ("Ascend910A", False),
                                      ("Ascend910ProB", False), ("Ascend910B", False), ("Ascend310P3", False)])
def test_bfloat16_only_where_the_product_has_it(soc, bf16):
    """torch_npu's IsBF16Supported() is `SocVersion >= Ascend910B1`: the original 910 (the plain
    "Ascend910B" included) and the 310P have no bfloat16. The capability says so (glmrt.load refuses
    the dtype there), every torch_npu kernel refuses bfloat16 nodes there, and so does the double."""
    backend = npu(soc=soc)
    assert (BF16 in backend.capabilities().dtypes) == bf16
    assert {FP32, FP16} <= set(backend.capabilities().dtypes)
    assert npu_kernels.product_dtypes(backend.product().family) == backend.capabilities().dtypes
    assert double.bf16_supported(soc) == bf16
    from glmrt.api import prepare
    from glmrt.errors import ConfigError
    if not bf16:
        with pytest.raises(ConfigError, match="bfloat16"):
            prepare("synthetic:chatglm3-6b", dtypes=backend.capabilities().dtypes, backend_name="npu",
                    dtype="bfloat16", layers=1, progress=False, materialize=False)
    for preset in ("chatglm3-6b", "glm-130b", "chatglm-6b"):
        for quant in (None, (8, 0)):
            plan = plan_of(tiny(preset), BF16, backend, quant=quant)
            vendor_ops = {s.impl for s in plan.steps if s.impl.startswith("torch_npu.")}
            if bf16:
                continue
            assert not vendor_ops, (soc, preset, vendor_ops)
            # where float16 takes a torch_npu op, bfloat16 falls back and says why
            fp16 = {s.node.name: s for s in plan_of(tiny(preset), FP16, backend, quant=quant).steps}
            for s in plan.steps:
                if fp16[s.node.name].impl.startswith("torch_npu."):
                    assert "no bfloat16" in s.reason, (s.node.name, s.reason)


def test_double_refuses_bfloat16_below_the_a2(torch_npu_double):
    x = torch.randn(2, 3, 4, 128)
    w = torch.ones(128)
    for soc in ("Ascend910A", "Ascend310P3"):
        torch_npu_double.npu.device_name = soc
        torch_npu_double.npu_rms_norm(x.half(), w.half())  # float16 runs
        with pytest.raises(torch_npu_double.ContractError, match="bfloat16 is not supported"):
            torch_npu_double.npu_rms_norm(x.bfloat16(), w.bfloat16())
        t = torch.rand(1, 3, 1, 128)
        with pytest.raises(torch_npu_double.ContractError, match="bfloat16 is not supported"):
            torch_npu_double.npu_rotary_mul(x.bfloat16(), t.bfloat16(), t.bfloat16())


@pytest.mark.parametrize("quant", [(8, 0), (4, 0), (4, 64)])
def test_quantized_linears_lower_to_weight_quant_batchmatmul(quant):
    plan = plan_of(tiny("chatglm3-6b"), BF16, quant=quant, strict=True)
    for s in plan.steps:
        if "quant" in s.node.attrs:
            assert s.impl == "torch_npu.npu_weight_quant_batchmatmul"
    fp32 = step(plan_of(tiny("chatglm3-6b"), FP32, quant=quant), "attn.qkv")
    assert fp32.kind == REFERENCE and "float16/bfloat16 activations" in fp32.reason


def _linear_node(n, k, bits, group, dtype=BF16):
    return Node("x.attn.qkv", "linear", ["x"], ["y"], {"weight": "w", "scale": "s"},
                {"in_features": k, "out_features": n, "quant": {"bits": bits, "group_size": group, "in_features": k}},
                [ValueSpec(("B", "T", k), dtype)], [ValueSpec(("B", "T", n), dtype)])


def test_weight_quant_refusals_are_precise():
    s = npu()._kernel_set
    assert "multiple of 8" in s.supports_weight_quant_matmul(_linear_node(100, 64, 4, 0))
    assert s.supports_weight_quant_matmul(_linear_node(100, 64, 8, 0)) is None  # int8 has no N constraint
    assert "[32, K-1]" in s.supports_weight_quant_matmul(_linear_node(64, 32, 8, 32))
    assert s.supports_weight_quant_matmul(_linear_node(64, 33, 8, 32)) is None
    assert "65535" in s.supports_weight_quant_matmul(_linear_node(70000, 64, 8, 0))


def test_older_torch_npu_signatures_are_honoured(monkeypatch):
    """6.0.x releases: npu_rotary_mul has no rotary_mode; FIA's scale is called scale_value."""
    def rotary_mul_without_mode(self, r1, r2):
        return double.npu_rotary_mul(self, r1, r2)

    def fia_with_scale_value(query, key, value, *, atten_mask=None, actual_seq_lengths_kv=None, num_heads=1,
                             scale_value=1.0, pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH",
                             num_key_value_heads=0, sparse_mode=0, inner_precise=0):
        return double.npu_fused_infer_attention_score(
            query, key, value, atten_mask=atten_mask, actual_seq_lengths_kv=actual_seq_lengths_kv,
            num_heads=num_heads, scale=scale_value, pre_tokens=pre_tokens, next_tokens=next_tokens,
            input_layout=input_layout, num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode,
            inner_precise=inner_precise)

    legacy = types.ModuleType("torch_npu")
    for name in dir(double):
        if name.startswith("npu"):
            setattr(legacy, name, getattr(double, name))
    legacy.npu_rotary_mul = rotary_mul_without_mode
    legacy.npu_fused_infer_attention_score = fia_with_scale_value
    monkeypatch.setitem(sys.modules, "torch_npu", legacy)
    plan = plan_of(tiny("chatglm3-6b"), BF16)
    rope = step(plan, op="rope")
    assert rope.kind == REFERENCE and "no rotary_mode" in rope.reason
    assert npu()._kernel_set._fia_scale_keyword() == "scale_value"
    _check_attention(BF16, cache=False, B=1, T=4, nh=4, nkv=2)  # runs through the legacy keyword
    # 'half' mode runs without passing rotary_mode (npu_rotary_mul before 7.0.0,
    # npu_apply_rotary_pos_emb before 7.2.0 have no such argument: passing it is a TypeError).
    legacy.npu_apply_rotary_pos_emb = lambda query, key, cos, sin, layout="BSND": \
        double.npu_apply_rotary_pos_emb(query, key, cos, sin, layout=layout)
    for preset, kernel_name in (("glm-130b", "torch_npu.npu_rotary_mul"), ("chatglm-6b", "torch_npu.npu_rotary_mul"),
                                ("glm-130b", "torch_npu.npu_apply_rotary_pos_emb"),
                                ("chatglm-6b", "torch_npu.npu_apply_rotary_pos_emb")):
        cfg = tiny(preset)
        node = node_of(cfg, "rope", FP16)
        kernel = next(k for k in npu().kernels() if k.name == kernel_name)
        assert kernel.supports(node) is None
        qkv = torch.randn(2, 3, cfg.qkv_size).to(FP16)
        ctx = _ctx(2, 3, two_d=cfg.rope_kind == "2d")
        for o, r in zip(kernel.fn(ctx, node, [qkv], {}), ops.rope(_ctx(2, 3, positions=ctx.positions), node, [qkv], {})):
            assert rel_err(o, r) <= _tolerance(FP16)
    assert double.calls("npu_fused_infer_attention_score")[-1].args["scale"] == pytest.approx(1 / math.sqrt(128))
    # Back on the current signatures, the cached argument names follow the module that is loaded.
    monkeypatch.setitem(sys.modules, "torch_npu", double)
    assert step(plan_of(tiny("chatglm3-6b"), BF16), op="rope").impl == "torch_npu.npu_rotary_mul"
    assert npu()._kernel_set._fia_scale_keyword() == "scale"


def test_apply_rotary_pos_emb_ub_formula_decides_and_the_double_enforces_it():
    """npu_apply_rotary_pos_emb is unusable when its documented ub_required exceeds the AI core's
    UB (192 KiB on A2/A3): 96 + 96 heads at D = 64 need 246784 bytes in bf16 and fp32, at D = 128
    twice that. Those nodes fall back (npu_rotary_mul takes them) and say why; the released
    ChatGLM-6B widths (32 + 32 heads at 64) fit."""
    assert npu_kernels.apply_rotary_pos_emb_ub_bytes(96, 96, 64, BF16) == 246784
    assert npu_kernels.apply_rotary_pos_emb_ub_bytes(96, 96, 64, FP32) == 246784
    assert npu_kernels.apply_rotary_pos_emb_ub_bytes(96, 96, 64, FP16) == 123392
    _, full_130b = config_from_dict(dict(PRESETS["glm-130b"]))
    _, full_6b = config_from_dict(dict(PRESETS["chatglm-6b"]))
    wide_2d = tiny("chatglm-6b", num_heads=96, num_kv_heads=96, hidden_size=96 * 128)
    for cfg, dtype, fits in ((full_130b.replace(num_layers=1), FP16, False), (wide_2d, BF16, False),
                             (wide_2d, FP32, False), (wide_2d, FP16, True), (full_6b.replace(num_layers=1), FP16, True)):
        rope = step(plan_of(cfg, dtype), op="rope")
        if fits:
            assert rope.impl == "torch_npu.npu_apply_rotary_pos_emb", rope.reason
        else:
            assert rope.impl == "torch_npu.npu_rotary_mul"
            assert "bytes of UB" in rope.reason and "196608" in rope.reason, rope.reason
    q = torch.randn(1, 2, 96, 64)
    ones = torch.ones(1, 2, 1, 64)
    with pytest.raises(double.ContractError, match="ub_required 246784 exceeds"):
        double.npu_apply_rotary_pos_emb(q, q.clone(), ones, ones, layout="BSND")
    double.npu_apply_rotary_pos_emb(q.half(), q.half(), ones.half(), ones.half(), layout="BSND")  # fits


def test_rotary_mul_interleave_only_on_the_aclnn_path(torch_npu_double):
    """'interleave' runs only through aclnnRotaryPositionEmbedding (A2/A3, jit_compile=False, a CANN
    with the op); the aclop kernel takes 'half' only. The predicate reads jit_compile from
    torch_npu and states what it cannot check; the double refuses as the aclop path does."""
    cfg = tiny("chatglm3-6b")
    torch_npu_double.npu.jit_compile = True
    try:
        rope = step(plan_of(cfg, BF16), op="rope")
        assert rope.kind == REFERENCE and "jit_compile=True" in rope.reason
        assert "a CANN that has the op" in rope.reason
        x, t = torch.randn(1, 3, 2, 64), torch.rand(1, 3, 1, 64)
        with pytest.raises(torch_npu_double.ContractError, match="only support rotary_mode with half"):
            torch_npu_double.npu_rotary_mul(x, t, t, rotary_mode="interleave")
        torch_npu_double.npu_rotary_mul(x, t, t, rotary_mode="half")
    finally:
        torch_npu_double.npu.jit_compile = False
    assert step(plan_of(cfg, BF16), op="rope").impl == "torch_npu.npu_rotary_mul"
    torch_npu_double.npu.device_name = "Ascend310P3"
    with pytest.raises(torch_npu_double.ContractError, match="only support rotary_mode with half"):
        torch_npu_double.npu_rotary_mul(torch.randn(1, 3, 2, 64), torch.rand(1, 3, 1, 64), torch.rand(1, 3, 1, 64),
                                        rotary_mode="interleave")


def test_inference_series_310p_constraints():
    """Atlas inference series (310P): no bfloat16 in npu_apply_rotary_pos_emb; the weight-quant
    matmul takes float16 activations with per-channel int8 only; no fused attention."""
    p310 = npu(soc="Ascend310P3")
    rope = step(plan_of(tiny("glm-130b"), BF16, p310), op="rope")
    assert rope.kind == REFERENCE and "npu_apply_rotary_pos_emb takes no bfloat16" in rope.reason
    assert "npu_rotary_mul takes no bfloat16" in rope.reason
    assert step(plan_of(tiny("glm-130b"), FP16, p310), op="rope").impl == "torch_npu.npu_apply_rotary_pos_emb"
    s = p310._kernel_set
    assert s.supports_weight_quant_matmul(_linear_node(64, 512, 8, 0, FP16)) is None
    assert "takes no bfloat16" in s.supports_weight_quant_matmul(_linear_node(64, 512, 8, 0, BF16))
    assert "per-channel scales only" in s.supports_weight_quant_matmul(_linear_node(64, 512, 8, 64, FP16))
    assert "npu_convert_weight_to_int4pack is not documented" in s.supports_weight_quant_matmul(
        _linear_node(64, 512, 4, 0, FP16))
    assert step(plan_of(tiny("chatglm3-6b"), FP16, p310), op="attention").kind == REFERENCE


def test_every_predicate_answers_for_every_preset_without_raising():
    for preset in sorted(PRESETS):
        for dtype in (FP32, BF16, FP16):
            for quant in (None, (8, 0), (4, 128)):
                for soc in (None, "Ascend910A"):
                    plan = plan_of(tiny(preset), dtype, npu(soc=soc), quant=quant)
                    for s in plan.steps:
                        assert s.kind in (VENDOR, REFERENCE) and s.reason


# ============================================================================ (b) kernels vs reference
def _ctx(B, T, *, positions=None, allowed=None, cache=None, pos=0, two_d=False, gen=None):
    if positions is None:
        positions = torch.randint(0, 200, (B, 2, T) if two_d else (B, T), generator=gen)
    if allowed is None:
        allowed = torch.ones(B, 1, T, pos + T, dtype=torch.bool)
    return ForwardContext(positions=positions, allowed=allowed, cache=cache, cache_pos=pos)


def _tolerance(dtype):
    return {FP32: 1e-5, BF16: 2e-2, FP16: 3e-3}[dtype]


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
def test_rms_norm_kernel_matches_reference(dtype, rng):
    node = node_of(tiny("chatglm3-6b"), "norm", dtype)
    x = torch.randn(2, 5, 512, generator=rng).to(dtype)
    w = (1 + 0.1 * torch.randn(512, generator=rng)).to(dtype)
    ctx = _ctx(2, 5)
    out = npu()._kernel_set.rms_norm(ctx, node, [x], {"weight": w})
    ref = ops.norm(ctx, node, [x], {"weight": w})
    assert out.dtype == dtype and rel_err(out, ref) <= _tolerance(dtype)
    if dtype != FP32:  # the op's fp32-then-round-once result is THUDM's, to the bit on this double
        assert torch.equal(out, ref)
    call = double.calls("npu_rms_norm")[-1]
    assert call.args["epsilon"] == node.attrs["eps"] and call.args["gamma"].dtype == dtype


ROPE_CASES = [("chatglm3-6b", "torch_npu.npu_rotary_mul"), ("glm-130b", "torch_npu.npu_apply_rotary_pos_emb"),
              ("glm-130b", "torch_npu.npu_rotary_mul"), ("chatglm-6b", "torch_npu.npu_apply_rotary_pos_emb"),
              ("chatglm-6b", "torch_npu.npu_rotary_mul")]


@pytest.mark.parametrize("preset,kernel_name", ROPE_CASES)
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_rope_kernels_match_reference(preset, kernel_name, dtype, rng):
    cfg = tiny(preset)
    node = node_of(cfg, "rope", dtype)
    kernel = next(k for k in npu().kernels() if k.name == kernel_name)
    assert kernel.supports(node) is None
    B, T = 3, 5
    qkv = torch.randn(B, T, cfg.qkv_size, generator=rng).to(dtype)
    ctx = _ctx(B, T, two_d=cfg.rope_kind == "2d", gen=rng)
    out = kernel.fn(ctx, node, [qkv], {})
    ref = ops.rope(_ctx(B, T, positions=ctx.positions), node, [qkv], {})
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert rel_err(o, r) <= _tolerance(dtype)


def test_interleaved_rope_calls_rotary_mul_on_the_slice_with_broadcast_tables(rng):
    cfg = tiny("chatglm3-6b")
    node = node_of(cfg, "rope", BF16)
    B, T = 2, 3
    npu()._kernel_set.rope_rotary_mul(_ctx(B, T, gen=rng), node, [torch.randn(B, T, cfg.qkv_size).to(BF16)], {})
    (call,) = double.calls("npu_rotary_mul")
    heads = cfg.num_heads + cfg.num_kv_heads
    assert call.args["rotary_mode"] == "interleave"
    assert tuple(call.args["x"].shape) == (1, B * T, heads, 64)  # the rotary slice, never the full head
    assert tuple(call.args["r1"].shape) == (1, B * T, 1, 64)  # fully broadcast over B and N
    assert not double.calls("npu_apply_rotary_pos_emb")


def test_activation_swiglu_matches_reference(rng):
    node = node_of(tiny("chatglm3-6b"), "activation", BF16)
    x = torch.randn(2, 4, 512, generator=rng).to(BF16)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    out = npu()._kernel_set.swiglu(_ctx(2, 4), node, [strided], {})
    assert rel_err(out, ops.activation(_ctx(2, 4), node, [x], {})) <= _tolerance(BF16)
    assert double.calls("npu_swiglu")[-1].args["dim"] == -1


def _attention_node(nh, nkv, dtype, layer=0, head_dim=128):
    hd = head_dim
    return Node(f"layers.{layer}.attn.core", "attention", ["q", "k", "v"], ["ctx"], {},
                {"layer_index": layer, "num_heads": nh, "num_kv_heads": nkv, "head_dim": hd,
                 "scale": 1 / math.sqrt(hd), "scaling": "standard", "mask_kind": "causal"},
                [ValueSpec(("B", "T", nh, hd), dtype)] + [ValueSpec(("B", "T", nkv, hd), dtype)] * 2,
                [ValueSpec(("B", "T", nh * hd), dtype)])


def _causal(B, T, start=0, pad=None, prefix=None):
    """(B, 1, T, start+T): causal, minus left padding `pad[b]`, plus a bidirectional prefix of
    `prefix[b]` keys (GLM-130B / ChatGLM-6B)."""
    S = start + T
    k = torch.arange(S)[None, :]
    allowed = (k <= torch.arange(start, S)[:, None])[None].expand(B, T, S).clone()
    valid = torch.ones(B, S, dtype=torch.bool)
    if pad is not None:
        valid = k.expand(B, S) >= torch.tensor(pad)[:, None]
    if prefix is not None:
        allowed |= (k < torch.tensor(prefix)[:, None])[:, None, :]
    return (allowed & valid[:, None, :])[:, None]


def _check_attention(dtype, *, cache, B, T, nh, nkv, past=0, pad=None, prefix=None, rng=None):
    node = _attention_node(nh, nkv, dtype)
    gen = rng or torch.Generator().manual_seed(1)
    q = torch.randn(B, T, nh, 128, generator=gen).to(dtype)
    k = torch.randn(B, T, nkv, 128, generator=gen).to(dtype)
    v = torch.randn(B, T, nkv, 128, generator=gen).to(dtype)
    allowed = _causal(B, T, past, pad, prefix)

    def context():
        if not cache:
            return _ctx(B, T, allowed=allowed)
        c = KVCache(1, B, nkv, past + T + 3, 128, dtype, CPU)
        history = torch.Generator().manual_seed(7)
        c.k[0][:, :, :past] = torch.randn(B, nkv, past, 128, generator=history).to(dtype)
        c.v[0][:, :, :past] = torch.randn(B, nkv, past, 128, generator=history).to(dtype)
        return _ctx(B, T, allowed=allowed, cache=c, pos=past)

    ctx_npu, ctx_ref = context(), context()
    out = npu()._kernel_set.fused_infer_attention(ctx_npu, node, [q, k, v], {})
    ref = ops.attention(ctx_ref, node, [q, k, v], {})
    live = allowed[:, 0].any(-1)  # (B, T): rows with a visible key (fully masked pad rows are unspecified)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out[live], ref[live]) <= _tolerance(dtype), (out[live] - ref[live]).abs().max()
    if cache:
        assert torch.equal(ctx_npu.cache.k[0], ctx_ref.cache.k[0]) and torch.equal(ctx_npu.cache.v[0], ctx_ref.cache.v[0])
    call = double.calls("npu_fused_infer_attention_score")[-1].args
    assert call["num_heads"] == nh and call["num_key_value_heads"] == nkv and call["sparse_mode"] == 0
    mask = call["atten_mask"]
    assert mask.dtype == torch.bool
    assert torch.equal(mask[..., :past + T], ~allowed)  # 1 = masked: glmrt's `allowed` inverted
    assert call["input_layout"] == ("BNSD" if cache else "BSND")
    return call


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (4, 2), (8, 1)])
def test_attention_prefill_without_cache(dtype, nh, nkv, rng):
    call = _check_attention(dtype, cache=False, B=2, T=6, nh=nh, nkv=nkv, pad=[0, 2], rng=rng)
    assert call["scale"] == pytest.approx(1 / math.sqrt(128))  # the op's default is 1.0


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_attention_prefill_and_decode_through_the_cache(dtype, rng):
    call = _check_attention(dtype, cache=True, B=2, T=5, nh=4, nkv=2, pad=[1, 0], rng=rng)
    assert call["actual_seq_lengths_kv"] == [5, 5] and call["inner_precise"] == 2
    call = _check_attention(dtype, cache=True, B=2, T=1, nh=4, nkv=2, past=6, pad=[2, 0], rng=rng)  # decode
    assert call["actual_seq_lengths_kv"] == [7, 7] and call["inner_precise"] == 0
    assert tuple(call["query"].shape) == (2, 4, 1, 128)


@pytest.mark.parametrize("cache", [False, True])
def test_attention_with_a_prefix_bidirectional_mask(cache, rng):
    """GLM-130B / ChatGLM-6B: keys before <sop> are visible to every query. The kernel takes
    whatever boolean mask ctx.allowed holds, as an explicit sparse_mode-0 mask."""
    _check_attention(BF16, cache=cache, B=2, T=7, nh=4, nkv=4, prefix=[4, 6], pad=[0, 1], rng=rng)
    if cache:  # a decode step after a prefix-masked prompt
        _check_attention(BF16, cache=True, B=1, T=1, nh=4, nkv=4, past=6, prefix=[4], rng=rng)


def test_int4_values_are_glmrts_unpacked_weight_transposed(rng):
    w = torch.randn(24, 40, generator=rng)
    packed, _ = quantize_weight(w, 4)
    values = npu_kernels.int4_values_kn(packed, 40)
    assert values.dtype == torch.int32 and values.shape == (40, 24) and values.is_contiguous()
    assert torch.equal(values, unpack_int4(packed, 40).t().to(torch.int32))
    assert torch.equal(double._unpack_int4(double.npu_convert_weight_to_int4pack(values)), values.long())


@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("bits,group", [(8, 0), (8, 64), (4, 0), (4, 32), (4, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_quant_matmul_matches_the_dequantizing_reference(dtype, bits, group, bias, rng):
    cfg = tiny("chatglm3-6b")
    node = node_of(cfg, "linear", dtype, quant=(bits, group), suffix="attn.qkv")  # K = 512, N = 1024
    w = 0.02 * torch.randn(1024, 512, generator=rng)
    qweight, scale = quantize_weight(w, bits, group, dtype)
    params = {"weight": qweight, "scale": scale}
    if bias:
        params["bias"] = (0.02 * torch.randn(1024, generator=rng)).to(dtype)
    x = torch.randn(3, 5, 512, generator=rng).to(dtype)
    kernels = npu()._kernel_set
    out = kernels.weight_quant_matmul(_ctx(3, 5), node, [x], params)
    ref = ops.linear(_ctx(3, 5), node, [x], params)
    assert out.shape == ref.shape == (3, 5, 1024) and out.dtype == dtype
    assert rel_err(out, ref) <= _tolerance(dtype)
    call = double.calls("npu_weight_quant_batchmatmul")[-1].args
    assert call["antiquant_group_size"] == group and call["antiquant_offset"] is None
    assert call["weight"].shape == ((512, 1024) if bits == 8 else (512, 128))
    if bias:
        assert call["bias"].dtype == (FP32 if dtype == BF16 else FP16)
    if group:  # the scale's layout follows the weight's (the double refuses or misreads the others)
        scale_arg = call["antiquant_scale"]
        assert scale_arg.shape == (512 // group, 1024)
        assert scale_arg.is_contiguous() if bits == 4 else scale_arg.t().is_contiguous()
    kernels.weight_quant_matmul(_ctx(3, 5), node, [x], params)  # a second forward reuses the conversion
    assert len(double.calls("npu_convert_weight_to_int4pack")) == (1 if bits == 4 else 0)


def test_prepare_weights_converts_int4_ahead_of_the_first_forward():
    cfg = tiny("chatglm3-6b")
    graph = build_graph(cfg, BF16)
    qgraph = quantize_graph(graph, 4, 0)
    weights = quantize_weights(graph, qgraph, synthetic_weights(graph))
    backend = npu()
    assert backend.prepare_weights(qgraph, weights) is weights
    converted = len(double.calls("npu_convert_weight_to_int4pack"))
    assert converted == 4 * cfg.num_layers
    plan = lower(qgraph, backend, weights)
    _run(plan, cfg, BF16, torch.randint(0, 256, (1, 4)), steps=1)
    assert len(double.calls("npu_convert_weight_to_int4pack")) == converted


# ---------------------------------------------------------------------------- the double refuses what the ops refuse
def test_double_reads_group_scales_the_way_the_op_does(rng):
    """aclnnWeightQuantBatchMatmulV2 (A2/A3): next to a contiguous weight the scale must be
    contiguous (a parameter error otherwise); next to a transposed weight its storage is read as the
    contiguous (N, G) matrix, so a contiguous (G, N) scale is misread without an error. Reference:
    the dequantized product x @ (q * s) computed here in fp32."""
    K, N, g = 128, 64, 32
    x = torch.randn(3, K, generator=rng).to(BF16)
    q = torch.randint(-7, 8, (N, K), generator=rng, dtype=torch.int8)  # glmrt's (N, K)
    s_ng = (0.01 + torch.rand(N, K // g, generator=rng)).to(BF16)  # (N, G), contiguous
    want = x.float() @ (q.float() * s_ng.float().repeat_interleave(g, dim=1)).t()  # (M, N)
    s_gn_view, s_gn = s_ng.t(), s_ng.t().contiguous()  # (G, N): a view of (N, G), or its own storage

    def run(weight, scale):
        return double.npu_weight_quant_batchmatmul(x, weight, scale, antiquant_group_size=g).float()

    assert rel_err(run(q.t(), s_gn_view), want) < 1e-2  # INT8: transposed weight, transposed scale
    assert rel_err(run(q.t(), s_gn), want) > 0.1  # silently misread, as on the device
    pack = double.npu_convert_weight_to_int4pack(q.t().to(torch.int32).contiguous().clamp(-8, 7))  # (K, N/8)
    assert rel_err(run(pack, s_gn), want) < 1e-2  # INT4 pack: contiguous weight, contiguous scale
    with pytest.raises(double.ContractError, match="antiquant_scale tensor is contiguous"):
        run(pack, s_gn_view)
    per_channel = s_ng[:, 0].contiguous()  # (N,): 1-D scales are read as given
    assert rel_err(double.npu_weight_quant_batchmatmul(x, q.t(), per_channel).float(),
                   x.float() @ (q.float() * per_channel.float()[:, None]).t()) < 1e-2


def test_double_refuses_what_torch_npu_refuses():
    x = torch.randn(2, 3, 4, 128, dtype=BF16)
    err = double.ContractError
    with pytest.raises(err, match="contiguous"):
        double.npu_swiglu(x.transpose(1, 2))
    per_batch = torch.rand(2, 3, 1, 128, dtype=BF16)
    double.npu_rotary_mul(x, per_batch, per_batch, rotary_mode="half")  # BS1D is fine in half mode
    with pytest.raises(err, match="fully broadcast"):
        double.npu_rotary_mul(x, per_batch, per_batch, rotary_mode="interleave")
    q96 = torch.randn(1, 3, 2, 96)
    with pytest.raises(err, match="64 or 128"):
        double.npu_apply_rotary_pos_emb(q96, q96.clone(), torch.ones(1, 3, 1, 96), torch.ones(1, 3, 1, 96),
                                        layout="BSND")
    q = torch.randn(1, 3, 2, 128)
    with pytest.raises(err, match="layout explicitly"):
        double.npu_apply_rotary_pos_emb(q, q.clone(), torch.ones(1, 3, 1, 128), torch.ones(1, 3, 1, 128))
    with pytest.raises(err, match="gamma dtype"):
        double.npu_rms_norm(x, torch.ones(128))
    xa = torch.randn(4, 64, dtype=BF16)
    w8 = torch.randint(-7, 8, (32, 64), dtype=torch.int8)  # (N, K): not transposed
    s = torch.ones(32, dtype=BF16)
    with pytest.raises(err, match=r"\(K, N\)"):
        double.npu_weight_quant_batchmatmul(xa, w8, s)
    double.npu_weight_quant_batchmatmul(xa, w8.t(), s)
    with pytest.raises(err, match="bias dtype"):
        double.npu_weight_quant_batchmatmul(xa, w8.t(), s, bias=torch.zeros(32, dtype=BF16))
    with pytest.raises(err, match="multiple of 32"):
        double.npu_weight_quant_batchmatmul(xa, w8.t(), torch.ones(2, 32, dtype=BF16), antiquant_group_size=48)
    with pytest.raises(err, match="8-aligned"):
        double.npu_convert_weight_to_int4pack(torch.zeros(64, 12, dtype=torch.int32))
    qa, ka = torch.randn(1, 4, 4, 128, dtype=BF16), torch.randn(1, 4, 2, 128, dtype=BF16)
    with pytest.raises(err, match="num_heads=1"):
        double.npu_fused_infer_attention_score(qa, ka, ka, input_layout="BSND")
    with pytest.raises(err, match="dtype"):
        double.npu_fused_infer_attention_score(qa.float(), ka.float(), ka.float(), num_heads=4,
                                               num_key_value_heads=2, input_layout="BSND")
    with pytest.raises(err, match="contiguous"):  # (B, S=4, N=4, D) viewed through a transpose
        double.npu_fused_infer_attention_score(qa.transpose(1, 2), ka, ka, num_heads=4, num_key_value_heads=2,
                                               input_layout="BSND")
    with pytest.raises(err, match="inner_precise"):
        double.npu_fused_infer_attention_score(qa[:, :1].contiguous(), ka, ka, num_heads=4, num_key_value_heads=2,
                                               input_layout="BSND", inner_precise=2)


def test_double_takes_only_the_documented_attention_mask_forms():
    err = double.ContractError
    q, k = torch.randn(2, 4, 3, 128, dtype=BF16), torch.randn(2, 4, 6, 128, dtype=BF16)  # BNSD, Q_S=3, KV_S=6
    kw = dict(num_heads=4, input_layout="BNSD", inner_precise=2)
    for shape in ((3, 6), (1, 3, 6), (2, 1, 3, 6), (1, 1, 3, 6), (2, 1, 16, 32)):  # the last rounded up
        double.npu_fused_infer_attention_score(q, k, k, atten_mask=torch.zeros(shape, dtype=torch.bool), **kw)
    for shape in ((2, 3, 6), (2, 4, 3, 6), (1, 1, 2, 6)):  # per-batch 3-D, per-head, too small
        with pytest.raises(err, match="atten_mask"):
            double.npu_fused_infer_attention_score(q, k, k, atten_mask=torch.zeros(shape, dtype=torch.bool), **kw)
    q1 = q[:, :, :1].contiguous()  # decode: Q_S = 1
    kw1 = dict(num_heads=4, input_layout="BNSD")
    for shape in ((2, 6), (1, 1, 6), (2, 1, 1, 6), (1, 1, 1, 6)):
        double.npu_fused_infer_attention_score(q1, k, k, atten_mask=torch.zeros(shape, dtype=torch.bool), **kw1)
    with pytest.raises(err, match="atten_mask"):
        double.npu_fused_infer_attention_score(q1, k, k, atten_mask=torch.zeros(3, 6, dtype=torch.bool), **kw1)
    wide = torch.randn(1, 2, 256, 256, dtype=BF16)  # BSND, N*D = 65536
    with pytest.raises(err, match="N\\*D < 65535"):
        double.npu_fused_infer_attention_score(wide, wide, wide, num_heads=256, input_layout="BSND")
    with pytest.raises(err, match="2-8 dims"):
        double.npu_rms_norm(torch.randn(128), torch.ones(128))


def test_fused_attention_predicate_refuses_what_the_double_refuses():
    node = _attention_node(256, 256, BF16, head_dim=256)
    assert "N*D < 65535" in npu()._kernel_set.supports_fused_infer_attention(node)


# ============================================================================ (c) whole models
def _positions(cfg, mask, steps):
    """Prefill positions (counting real tokens, as glmrt's runtime does) and the decode ones."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    decode = [pos[:, -1:] + 1 + i for i in range(steps)]
    if cfg.rope_kind == "2d":  # (position, block position)
        pos = torch.stack((pos, torch.zeros_like(pos)), dim=1)
        decode = [torch.stack((pos[:, 0, -1:], torch.full_like(d, i + 1)), dim=1) for i, d in enumerate(decode)]
    return pos, decode


def _run(plan, cfg, dtype, ids, steps, pad=None, prefix=None):
    """Prefill (all positions' logits, through the KV cache) then `steps` decode steps with
    fixed tokens (teacher forcing, so both plans see the same inputs). Returns logits per step."""
    B, T = ids.shape
    mask = torch.ones(B, T, dtype=torch.long)
    if pad is not None:
        for b, p in enumerate(pad):
            mask[b, :p] = 0
    positions, decode_positions = _positions(cfg, mask, steps)
    cache = KVCache(cfg.num_layers, B, cfg.num_kv_heads, T + steps, cfg.head_dim, dtype, CPU)
    allowed = _causal(B, T, pad=pad, prefix=prefix)
    out = [execute(plan, ForwardContext(positions, allowed, cache, 0), ids)]
    key_valid = torch.cat((mask.bool(), torch.ones(B, steps, dtype=torch.bool)), dim=1)
    tokens = torch.Generator().manual_seed(99)
    for i in range(steps):
        token = torch.randint(0, cfg.vocab_size, (B, 1), generator=tokens)
        pos = T + i
        ctx = ForwardContext(decode_positions[i], key_valid[:, None, None, :pos + 1], cache, pos)
        out.append(execute(plan, ctx, token))
    return out


class ReferenceOnCPU(Backend):
    """Every node on glmrt's plain-torch reference op (the oracle), on the CPU. (The cpu backend's
    own plan is not the oracle: its native INT8/INT4 kernels quantize the activations.)"""

    name = "reference-cpu"
    device_type = "cpu"

    def probe(self) -> ProbeResult:
        return ProbeResult(True, "the host CPU")

    def verification(self) -> Verification:
        return Verification("run-verified", "it is the reference")


def _compare_models(cfg, dtype, quant=None, pad=None, prefix=None, batch=2, T=7, steps=3, tol=None, fuse=False):
    graph = build_graph(cfg, dtype)
    weights = synthetic_weights(graph)
    if quant is not None:
        qgraph = quantize_graph(graph, *quant)
        weights, graph = quantize_weights(graph, qgraph, weights), qgraph
    if fuse:  # both plans run the graph glmrt.load would give the npu backend
        graph = fuse_residual_norm(graph, backend_accepts(npu()))
    ids = torch.randint(0, cfg.vocab_size, (batch, T), generator=torch.Generator().manual_seed(5))
    npu_plan, cpu_plan = lower(graph, npu(), weights), lower(graph, ReferenceOnCPU(), weights)
    double.reset()
    got = _run(npu_plan, cfg, dtype, ids, steps, pad, prefix)
    want = _run(cpu_plan, cfg, dtype, ids, steps, pad, prefix)
    # Observed: fp32 ~1e-6, fp16 ~1e-3, bf16 ~1e-2 (the double computes in fp32, the reference in
    # the model dtype); a wrong pairing, mask or layout gives errors of order 1.
    tol = tol or {FP32: 1e-5, BF16: 3e-2, FP16: 3e-3}[dtype]
    live = torch.ones(batch, T, dtype=torch.bool)
    if pad is not None:  # left-padding rows are fully masked: their outputs are unspecified
        for b, p in enumerate(pad):
            live[b, :p] = False
    assert rel_err(got[0][live], want[0][live]) <= tol, "prefill"
    for i, (g, w) in enumerate(zip(got[1:], want[1:])):
        assert rel_err(g, w) <= tol, f"decode step {i}"
    return npu_plan


CAUSAL_PRESETS = sorted(p for p in PRESETS if p not in ("glm-130b", "chatglm-6b"))


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
@pytest.mark.parametrize("preset", CAUSAL_PRESETS)
def test_whole_model_matches_the_reference_plan(preset, dtype):
    plan = _compare_models(tiny(preset), dtype, pad=[0, 2])
    used = {c.op for c in double.CALLS}
    assert {"npu_rotary_mul", "npu_swiglu"} <= used
    if dtype != FP32:
        assert "npu_fused_infer_attention_score" in used
        assert not any(s.kind == REFERENCE for s in plan.steps if s.node.op != "norm")


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
@pytest.mark.parametrize("quant", [(8, 0), (4, 0), (4, 64), (8, 128)])
def test_whole_quantized_model_matches_the_reference_plan(quant, dtype):
    _compare_models(tiny("chatglm3-6b"), dtype, quant=quant)
    if dtype != FP32:
        assert double.calls("npu_weight_quant_batchmatmul")
        assert len(double.calls("npu_convert_weight_to_int4pack")) == (4 * 2 if quant[0] == 4 else 0)


@pytest.mark.parametrize("preset", ["glm-130b", "chatglm-6b"])
@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_prefix_masked_generations_match_the_reference_plan(preset, dtype):
    """Released semantics: layer-scaled attention falls back, the RoPE runs on torch_npu."""
    _compare_models(tiny(preset), dtype, prefix=[4, 3], pad=[0, 1])
    assert double.calls("npu_apply_rotary_pos_emb")


@pytest.mark.parametrize("quant", [None, (8, 0), (4, 64)])
def test_prefix_mask_through_fused_attention_in_a_whole_model(quant):
    """A GLM-130B-shaped model with standard scaling (a synthetic variant, so that the prefix
    mask goes through npu_fused_infer_attention_score in every layer)."""
    cfg = tiny("glm-130b", attention_scaling="standard")
    _compare_models(cfg, BF16, quant=quant, prefix=[5, 2], pad=[1, 0])
    assert double.calls("npu_fused_infer_attention_score")


# ----------------------------------------------------------------------------- static and graph decode
@pytest.mark.parametrize("mode", ["static", "graph"])
@pytest.mark.parametrize("preset", ["chatglm3-6b", "glm-4-9b-0414"])
def test_static_and_graph_decode_give_the_eager_tokens(preset, mode, monkeypatch):
    """decode_mode "static" (the cache position on the device, attention over the whole cache under
    a device-built mask) and "graph" (that step captured once with torch.npu.graph and replayed,
    the double's NPUGraph: replay reruns the captured ops on the captured buffers) must give the
    tokens of eager decode through the same kernels. Reference: the npu plan's own eager decode,
    itself checked against the reference plan above. A kernel that writes the cache at
    ctx.cache_pos (0 in static decode) or reads a position on the host fails here."""
    from glmrt.model import Model

    cfg = tiny(preset)
    graph = build_graph(cfg, FP16)
    weights = synthetic_weights(graph)
    plan = lower(graph, npu(), weights)
    assert step(plan, op="attention").impl == "torch_npu.npu_fused_infer_attention_score"
    captured = []

    class RecordingGraph(double.NPUGraph):
        def __init__(self):
            super().__init__()
            captured.append(self)

    if mode == "graph":  # the cpu device stands in for "npu": torch.<device>.NPUGraph / .graph
        monkeypatch.setattr(torch.cpu, "NPUGraph", RecordingGraph, raising=False)
        monkeypatch.setattr(torch.cpu, "graph", double.graph, raising=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    model = Model(cfg, graph, plan, weights, "tiny")
    model.decode_mode = "eager"
    want = model.generate(ids, 6, attention_mask=mask, eos_token_id=[])
    eager_calls = len(double.calls("npu_fused_infer_attention_score"))
    double.reset()
    model.decode_mode = mode
    got = model.generate(ids, 6, attention_mask=mask, eos_token_id=[])
    assert got.shape == want.shape and torch.equal(got, want), f"{mode}:\n{got}\neager:\n{want}"
    calls = [c.args for c in double.calls("npu_fused_infer_attention_score")]
    decode = [c for c in calls if c["query"].shape[2] == 1]
    assert decode and all(c["actual_seq_lengths_kv"] is None for c in decode)  # nothing read on the host
    assert all(c["atten_mask"].shape[-1] == c["key"].shape[2] for c in decode)  # the whole cache, masked
    if mode == "graph":
        assert captured and sum(g.replays for g in captured) >= 5  # the 5 decode steps were replays
        # per layer at most: prefill + 2 warm-ups + 1 capture; the eager run called it at every step
        assert len(calls) < eager_calls
    again = model.generate(ids, 6, attention_mask=mask, eos_token_id=[])  # a second call, same shapes
    assert torch.equal(again, want)


# ----------------------------------------------------------------------------- npu_add_rms_norm
def test_fused_residual_rmsnorm_lowers_to_add_rms_norm():
    plan = plan_of(tiny("chatglm3-6b"), BF16, fuse=True, strict=True)
    fused = [s for s in plan.steps if s.node.op == RESIDUAL_NORM]
    assert len(fused) == 4 and {s.impl for s in fused} == {"torch_npu.npu_add_rms_norm"}
    assert [s.node.name for s in plan.steps if s.node.op == "norm"] == ["layers.0.attn_norm"]
    assert not [s for s in plan.steps if s.node.op == "residual"]


@pytest.mark.parametrize("preset,dtype,soc,why", [
    ("glm-4-9b-0414", BF16, "Ascend910B3", "before the weight"),  # transformers' rounding
    ("chatglm-6b", FP16, "Ascend910B3", "layernorm"),
    ("chatglm3-6b", BF16, "Ascend910A", "not documented for"),  # the original 910
    ("chatglm3-6b", BF16, "Ascend310P3", "no bfloat16"),
])
def test_add_rms_norm_refusals_leave_the_graph_unfused(preset, dtype, soc, why):
    backend = npu(soc=soc)
    graph = build_graph(tiny(preset), dtype)
    node = fused_nodes(fuse_residual_norm(graph))[0]
    assert why in backend._kernel_set.supports_add_rms_norm(node)
    assert not fused_nodes(fuse_residual_norm(graph, backend_accepts(backend)))


def test_deepnorm_alpha_is_refused_by_name():
    node = fused_nodes(fuse_residual_norm(build_graph(tiny("chatglm-6b", norm_kind="rmsnorm"), FP16)))[0]
    assert node.attrs["alpha"] != 1.0
    assert "alpha" in npu()._kernel_set.supports_add_rms_norm(node)


@pytest.mark.parametrize("emit", [True, False])
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
def test_add_rms_norm_kernel_matches_reference(dtype, emit, rng):
    node = fused_nodes(fuse_residual_norm(build_graph(tiny("chatglm3-6b"), dtype)))[0 if emit else -1]
    assert node.attrs["emit_residual"] == emit
    res = torch.randn(2, 5, 512, generator=rng).to(dtype)
    branch = torch.randn(2, 5, 512, generator=rng).to(dtype)
    w = (1 + 0.1 * torch.randn(512, generator=rng)).to(dtype)
    ctx = _ctx(2, 5)
    got = npu()._kernel_set.add_rms_norm(ctx, node, [res, branch], {"weight": w})
    want = ops.residual_norm(ctx, node, [res, branch], {"weight": w})
    if emit:
        assert torch.equal(got[0], want[0])  # the new residual: the same elementwise sum
        got, want = got[1], want[1]
    assert got.dtype == dtype and rel_err(got, want) <= _tolerance(dtype)
    if dtype != FP32:  # fp32 statistics, one rounding: THUDM's RMSNorm of the rounded sum, to the bit
        assert torch.equal(got, want)
    call = double.calls("npu_add_rms_norm")[-1]
    assert call.args["epsilon"] == node.attrs["eps"] and call.args["gamma"].dtype == dtype


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
@pytest.mark.parametrize("preset", ["chatglm3-6b", "glm-4-9b", "glm-4-9b-0414"])
def test_whole_fused_model_matches_the_reference_plan(preset, dtype):
    plan = _compare_models(tiny(preset), dtype, pad=[0, 2], fuse=True)
    fused = [s for s in plan.steps if s.node.op == RESIDUAL_NORM]
    rounds_before = tiny(preset).rmsnorm_round_before_weight and dtype != FP32
    assert bool(fused) != rounds_before
    if fused:
        assert {s.impl for s in fused} == {"torch_npu.npu_add_rms_norm"}
        assert len(double.calls("npu_add_rms_norm")) == len(fused) * 4  # prefill + 3 decode steps
