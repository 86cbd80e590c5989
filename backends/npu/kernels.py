"""torch_npu kernels of the npu backend, and the shape/dtype/product checks that guard them.

Every vendor op is reached through :func:`vendor` (``import torch_npu`` on first use), so the
contract tests can monkeypatch a test double (tests/npu_double) in as ``sys.modules["torch_npu"]``.
Signatures are torch_npu 2.13.0's (``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`` in
the wheel) and its op documentation (``torch_npu/_op_plugin_docs.py``, op-plugin's docs/context);
each ``supports_*`` predicate encodes the documented constraints that a node's shapes and dtypes
can violate, and says precisely why when it refuses (the node then runs the torch reference).

Products (``torch.npu.get_device_name()``): the original Ascend 910 ("Ascend910A", "Ascend910ProB",
... = "Atlas training series") runs far fewer fused ops than the 910B ("Ascend910B1".."B4" = Atlas
A2) and 910_93xx (Atlas A3); each op's product table below is the one op-plugin documents.

npu_add_rms_norm runs the residual_norm node that glmrt.fusion makes (residual + RMSNorm), where
the model's residual is a plain sum (not DeepNorm's alpha-scaled one) and the norm's rounding is
the op's.

Not lowered to: npu_incre_flash_attention / npu_prompt_flash_attention (npu_fused_infer_attention_score
runs both branches on A2/A3; neither is documented for the original 910, and on the 310P the
prompt op takes no GQA and no actual_seq_lengths_kv, so a plan could not use them for both steps).
"""

from __future__ import annotations

import inspect
import re
import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from ... import ops
from ..._bootstrap import probe_torch_npu
from ..base import VENDOR, Kernel

# ----------------------------------------------------------------------------- the vendor module
def vendor():
    """The torch_npu module every kernel calls, imported on first use (never at glmrt import time).

    Whatever ``sys.modules["torch_npu"]`` holds is used: the contract tests put their test double
    there (tests/npu_double, monkeypatched into the test process only); the runtime has no other
    seam for it."""
    import torch_npu  # noqa: PLC0415
    return torch_npu


def loaded_vendor():
    """The vendor module if it can be used here without risk, else None: a torch_npu already in
    this process, or one whose subprocess probe succeeded. Plans for absent hardware (and a
    torch_npu whose CANN is missing) never import torch_npu."""
    module = sys.modules.get("torch_npu")
    if module is not None:
        return module
    if probe_torch_npu()[0]:
        return vendor()
    return None


_MISSING = object()
_keyword_cache: dict[str, tuple[object, object]] = {}  # op name -> (the op object read, its names)


def op_keywords(op_name: str):
    """The argument names the loaded vendor op accepts: a frozenset, None when they cannot be
    read (assume op-plugin master's), or _MISSING when the op does not exist. torch_npu's ops are
    C++ bindings, so their names come from the registered schema (``torch.ops.npu.<op>``)."""
    module = loaded_vendor()
    if module is None:
        return None
    fn = getattr(module, op_name, None)
    cached = _keyword_cache.get(op_name)
    if cached is not None and cached[0] is fn:
        return cached[1]
    if fn is None:
        names = _MISSING
    else:
        try:
            names = frozenset(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            try:
                schema = getattr(torch.ops.npu, op_name).default._schema
                names = frozenset(a.name for a in schema.arguments)
            except Exception:  # noqa: BLE001 - unknown: assume the documented signature
                names = None
    _keyword_cache[op_name] = (fn, names)
    return names


# ----------------------------------------------------------------------------- products
TRAINING_910 = "Atlas training series (original Ascend 910)"
A2 = "Atlas A2 (Ascend 910B)"
A3 = "Atlas A3 (Ascend 910_93)"
INFERENCE = "Atlas inference series (Ascend 310P)"
UNKNOWN = "unknown Ascend product"

# Which products each op supports, as op-plugin documents it.
OP_PRODUCTS = {
    "npu_rms_norm": {TRAINING_910, A2, A3, INFERENCE},
    "npu_add_rms_norm": {A2, A3, INFERENCE},  # aclnnAddRmsNorm; the inference series: fp32/fp16 only
    "npu_rotary_mul": {TRAINING_910, A2, A3, INFERENCE},  # but see ROTARY_MUL_GENERAL
    "npu_apply_rotary_pos_emb": {A2, A3, INFERENCE},
    "npu_swiglu": {A2},  # the only product its documentation lists
    "npu_fused_infer_attention_score": {A2, A3},
    "npu_weight_quant_batchmatmul": {A2, A3, INFERENCE},  # the 310P: fp16 x, int8 per-channel only
    "npu_convert_weight_to_int4pack": {A2, A3},
}
# bfloat16 exists from the Atlas A2 on: torch_npu's c10_npu::IsBF16Supported() is
# `GetSocVersion() >= SocVersion::Ascend910B1` (Ascend/pytorch torch_npu/csrc/core/npu/NpuVariables.cpp),
# false for the original 910 (Ascend910A/ProA/ProB/PremiumA, the plain "Ascend910B" = 104) and the
# 310P (200..); the ops' own tables say the same (aclnnRmsNorm, aclnnApplyRotaryPosEmb: "Atlas
# inference series: FLOAT32, FLOAT16"). Products newer than A3 are not assumed to have it here.
BF16_PRODUCTS = {A2, A3}


def product_dtypes(family: str) -> tuple[torch.dtype, ...]:
    """The activation dtypes a product runs (capabilities() and every kernel predicate)."""
    if family in BF16_PRODUCTS:
        return (torch.float32, torch.bfloat16, torch.float16)
    return (torch.float32, torch.float16)


# On-chip Unified Buffer of one AI core, bytes: 192 KiB on the Atlas A2/A3 (hicann/catlass
# include/acot/arch/arch.hpp, AtlasA2::UB_SIZE). The 310P's is not stated in the sources read; the
# A2's (the smaller figure seen) is assumed, so a call that fits here fits there.
UB_BYTES = {A2: 192 * 1024, A3: 192 * 1024, INFERENCE: 192 * 1024}


def apply_rotary_pos_emb_ub_bytes(q_heads: int, k_heads: int, d: int, dtype: torch.dtype) -> int:
    """The UB npu_apply_rotary_pos_emb needs, from its documented formula (CANN op proto nn_other.h,
    REG_OP(ApplyRotaryPosEmb): "ub_required = (q_n + k_n) * d * cast_size * 5 + d * dtype_size * 4 +
    cast * d * 8"; ops-transformer posembedding/apply_rotary_pos_emb/docs/aclnnApplyRotaryPosEmb.md
    gives the same with d = 128): bfloat16 is computed in fp32 (cast 1, cast_size 4, dtype_size 2),
    float16/float32 in their own dtype (cast 0, cast_size = dtype_size). The op is unusable when it
    exceeds the core's UB."""
    dtype_size = torch.finfo(dtype).bits // 8
    cast = 1 if dtype == torch.bfloat16 else 0
    cast_size = 4 if cast else dtype_size
    return (q_heads + k_heads) * d * cast_size * 5 + d * dtype_size * 4 + cast * d * 8


# npu_rotary_mul's general kernel (jit_compile=False: any even D < 896, 'interleave' mode) exists on
# A2/A3 only; elsewhere it is 'half' mode with D = 128 and 11SD/1S1D/S11D tables.
ROTARY_MUL_GENERAL = {A2, A3}
# op-plugin's npu_rotary_mul (op_plugin/ops/opapi/RotaryMulKernelNpuOpApi.cpp) runs
# aclnnRotaryPositionEmbedding (both modes) only when the CANN has that op (DO_COMPATIBILITY), the
# SoC is at least Ascend910B1 and jit_compile is False (else op-plugin dispatches to the aclop
# kernel); the aclop kernel (op_plugin/ops/aclops/RotaryMulKernelNpu.cpp) refuses any rotary_mode
# but 'half'. The CANN's op list cannot be read from Python, so that condition is only stated.
ROTARY_MUL_INTERLEAVE_PATH = ("'interleave' exists only on the aclnn path (aclnnRotaryPositionEmbedding: Atlas A2/A3, "
                              "jit_compile=False, a CANN that has the op); the aclop kernel takes rotary_mode='half' only")


def jit_compile_enabled() -> bool | None:
    """True/False from the loaded torch_npu (torch_npu.npu.is_jit_compile_false(), npu_config.py),
    None when it cannot be asked (no torch_npu loaded, or a release without the function)."""
    module = loaded_vendor()
    ask = getattr(getattr(module, "npu", None), "is_jit_compile_false", None) if module is not None else None
    if ask is None:
        return None
    try:
        return not bool(ask())
    except Exception:  # noqa: BLE001 - cannot tell
        return None


def _mode_kwargs(op_name: str, mode: str) -> dict:
    """rotary_mode=... only where the installed op has the keyword (npu_rotary_mul from op-plugin
    7.0.0, npu_apply_rotary_pos_emb from 7.2.0; read from its signature or registered schema).
    'half' is every release's default, so it is left out where the names cannot be read; the
    predicates refuse 'interleave' where the keyword is known to be missing."""
    keywords = op_keywords(op_name)
    if keywords is _MISSING or (keywords is None and mode == "half"):
        return {}
    if keywords is None or "rotary_mode" in keywords:
        return {"rotary_mode": mode}
    return {}


def product_family(soc: str) -> str:
    if re.fullmatch(r"Ascend910B\d.*", soc):
        return A2
    if re.fullmatch(r"Ascend910_93\d*.*", soc):
        return A3
    if soc.startswith("Ascend910"):  # 910A, 910ProA, 910ProB, 910PremiumA
        return TRAINING_910
    if soc.startswith("Ascend310P"):
        return INFERENCE
    return UNKNOWN


@dataclass(frozen=True)
class Product:
    soc: str
    family: str
    assumed: bool  # no device to ask: the documented A2 behaviour is assumed

    def describe(self) -> str:
        return f"{self.soc} ({self.family}{', assumed: no device to ask' if self.assumed else ''})"


def detect_product(soc: str | None = None) -> Product:
    if soc is not None:
        return Product(soc, product_family(soc), False)
    module = loaded_vendor()
    if module is not None:
        try:
            name = module.npu.get_device_name(0)
            return Product(name, product_family(name), False)
        except Exception:  # noqa: BLE001 - fall through to the assumption
            pass
    return Product("Ascend910B", A2, True)


# ----------------------------------------------------------------------------- helpers
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _split_qkv(qkv: torch.Tensor, a: dict):
    """Fused qkv (B, T, (nh + 2 nkv) hd) -> q (B,T,nh,hd), k (B,T,nkv,hd), v (B,T,nkv,hd) views."""
    hd, nh, nkv = a["head_dim"], a["num_heads"], a["num_kv_heads"]
    q, k, v = qkv.split((nh * hd, nkv * hd, nkv * hd), dim=-1)
    return q.unflatten(-1, (nh, hd)), k.unflatten(-1, (nkv, hd)), v.unflatten(-1, (nkv, hd))


def rope_tables(ctx, a: dict, dtype: torch.dtype, pairing: str):
    """Full-width cos/sin for the rotary ops, (B, T, d) each, memoised per step.

    pairing "interleave": each angle repeated for its pair (c0 c0 c1 c1 ...), as
    npu_rotary_mul(rotary_mode='interleave') reads them; "half": cat(c, c), the NeoX layout.
    2-D RoPE returns two such pairs (position, block position), each over head_dim / 2 dims."""
    key = ("npu.rope", a["kind"], a["rotary_dim"], a["base"], a["table_dtype"], dtype, pairing)
    if key in ctx.memo:
        return ctx.memo[key]

    def widen(cos_sin):
        cos, sin = cos_sin  # (B, T, d/2)
        if pairing == "interleave":
            return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    if a["kind"] == "2d":
        half = a["head_dim"] // 2
        tables = tuple(widen(ops.rope_tables(ctx.positions[:, i], half, a["base"], dtype, a["table_dtype"]))
                       for i in (0, 1))
    else:
        tables = widen(ops.rope_tables(ctx.positions, a["rotary_dim"], a["base"], dtype, a["table_dtype"]))
    ctx.memo[key] = tables
    return tables


class Int4PackCache:
    """glmrt INT4 weights converted once to the int32 pack npu_weight_quant_batchmatmul takes,
    keyed by the glmrt tensor (dropped with it). Holds a second copy of each INT4 weight until
    the contract gets a prepare_weights slot that lets the plan bind the converted tensor."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def get(self, packed: torch.Tensor, in_features: int) -> torch.Tensor:
        key = id(packed)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is packed:
            return entry[1]
        converted = vendor().npu_convert_weight_to_int4pack(int4_values_kn(packed, in_features))
        entries = self._entries

        def drop(ref, key=key):
            if entries.get(key, (None,))[0] is ref:
                del entries[key]

        self._entries[key] = (weakref.ref(packed, drop), converted)
        return converted

    def __len__(self) -> int:
        return len(self._entries)


def int4_values_kn(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """glmrt's INT4 bytes (N, ceil(K/2)) int8, even index in the high nibble -> the (K, N) int32
    matrix of values in [-8, 7] that npu_convert_weight_to_int4pack packs (its (k, n) form; the
    pack's own bit order is the op's business, glmrt never reads it)."""
    from ...quant import unpack_int4
    return unpack_int4(packed, in_features).t().to(torch.int32).contiguous()  # (K, N)


def antiquant_scale(scale: torch.Tensor, group_size: int, dtype: torch.dtype, weight_transposed: bool) -> torch.Tensor:
    """glmrt's scale (N,) or (N, G) -> the op's (N,) per-channel or (G, N) per-group layout, in the
    activation dtype (the op requires the scale's dtype to equal x's).

    The layout of a per-group scale must follow the weight's (aclnnWeightQuantBatchMatmulV2's
    ContiguousCheck / CheckContiguous, hicann/ops-nn
    matmul/weight_quant_batch_matmul_v2/op_host/op_api/aclnn_weight_quant_batch_matmul_v2.cpp):
    with a contiguous (K, N) weight (the INT4 int32 pack) the scale must be a contiguous (G, N),
    else ACLNN_ERR_PARAM_INVALID; with a transposed weight (INT8, glmrt's (N, K) viewed as (K, N))
    the op reads the scale's storage as a contiguous (N, G) (CreateTransposedView), so it must be
    the transposed view of one -- a contiguous (G, N) there is silently misread."""
    if group_size == 0:
        return scale.to(dtype)
    s = scale.to(dtype).contiguous()  # (N, G)
    return s.t() if weight_transposed else s.t().contiguous()  # (G, N): a view, or its own storage


def bias_for(x_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor | None:
    """npu_weight_quant_batchmatmul wants an fp32 bias with bf16 activations, fp16 with fp16."""
    if bias is None:
        return None
    return bias.to(torch.float32 if x_dtype == torch.bfloat16 else x_dtype).contiguous()


# The one-line hardware check of npu_fused_infer_attention_score's mask polarity (unverified here):
# one query over two keys with equal scores, values 0 and 1, the first key masked by True. Prints
# [1.0, 1.0] (decode branch Q_S = 1, prompt branch Q_S = 2) if True masks, as glmrt assumes;
# [0.0, 0.0] if True keeps; 0.5 where the mask was ignored.
FIA_MASK_POLARITY_CHECK = (
    "python -c \"import torch, torch_npu; d='npu'; f=torch.float16; "
    "k=torch.zeros(1,1,2,128,dtype=f,device=d); v=torch.stack((torch.zeros(128),torch.ones(128))).to(f).to(d)[None,None]; "
    "print([torch_npu.npu_fused_infer_attention_score(torch.ones(1,1,s,128,dtype=f,device=d),k,v,"
    "atten_mask=torch.tensor([True,False],device=d).repeat(1,1,s,1),num_heads=1,input_layout='BNSD',scale=1.0)[0]"
    ".float().mean().item() for s in (1,2)], '1.0: True masks (what glmrt passes); 0.0: True keeps')\"")


# ----------------------------------------------------------------------------- the kernel set
class NPUKernels:
    """The npu backend's kernels. Predicates read the node and the product; kernel functions call
    the vendor op with the documented layout and return glmrt's layout."""

    def __init__(self, product: Callable[[], "Product"]):
        self._product_fn = product
        self.int4_cache = Int4PackCache()

    @property
    def product(self) -> Product:
        return self._product_fn()

    def _product_refusal(self, op_name: str, allowed: set[str] | None = None,
                         dtype: torch.dtype | None = None) -> str | None:
        """Why ``op_name`` cannot run on this product (not in its products table, not in this
        torch_npu, or ``dtype`` bfloat16 on a product without bfloat16), or None."""
        p = self.product
        allowed = OP_PRODUCTS[op_name] if allowed is None else allowed
        if p.family not in allowed:
            return f"{op_name} is not documented for {p.describe()}; it runs on {', '.join(sorted(allowed))}"
        if op_keywords(op_name) is _MISSING:
            return f"this torch_npu has no {op_name}"
        if dtype == torch.bfloat16 and p.family not in BF16_PRODUCTS:
            return (f"{op_name} takes no bfloat16 on {p.describe()}: bfloat16 starts with the Atlas A2 "
                    "(torch_npu's IsBF16Supported() is false below Ascend910B1)")
        return None

    # ------------------------------------------------------------------ norm: npu_rms_norm
    def supports_rms_norm(self, node) -> str | None:
        a = node.attrs
        if a.get("kind") != "rmsnorm":
            return f"npu_rms_norm is RMSNorm; this node is {a.get('kind')} (LayerNorm runs torch's layer_norm)"
        dtype = node.input_specs[0].dtype
        if dtype not in FLOAT_DTYPES:
            return f"npu_rms_norm takes float16/bfloat16/float32, not {_dtype_name(dtype)}"
        # npu_rms_norm computes x * rsqrt(mean(x^2) + eps) * gamma in fp32 and rounds once, which
        # is THUDM's convention; transformers' glm/glm4 round the normalized value before the
        # weight multiply. In fp32 the two are the same computation.
        if a.get("round_before_weight") and dtype != torch.float32:
            return ("npu_rms_norm multiplies by the weight in fp32 and rounds once (THUDM's RMSNorm); this node "
                    f"rounds the normalized value to {_dtype_name(dtype)} before the weight multiply (transformers' "
                    "glm/glm4), which the op cannot reproduce bit for bit")
        return self._product_refusal("npu_rms_norm", dtype=dtype)

    def rms_norm(self, ctx, node, inputs, params):
        x = inputs[0]
        gamma = params["weight"].to(x.dtype)  # the op requires gamma's dtype to equal x's
        return vendor().npu_rms_norm(x, gamma, epsilon=float(node.attrs["eps"]))[0]

    # ------------------------------------------------------------------ residual + norm: npu_add_rms_norm
    def supports_add_rms_norm(self, node) -> str | None:
        """npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x): x = x1 + x2 in the input
        dtype (the new residual), y = RMSNorm(x) * gamma in fp32, rounded once."""
        a = node.attrs
        if a.get("kind") != "rmsnorm":
            return f"npu_add_rms_norm is residual + RMSNorm; this node's norm is {a.get('kind')}"
        if a.get("alpha", 1.0) != 1.0:
            return (f"npu_add_rms_norm adds x1 + x2; this node scales the residual by alpha {a['alpha']:g} "
                    "(DeepNorm) first")
        dtypes = {s.dtype for s in node.input_specs}
        if len(dtypes) != 1:
            return "npu_add_rms_norm needs x1 and x2 of one dtype; residual and branch differ"
        dtype = node.input_specs[0].dtype
        if dtype not in FLOAT_DTYPES:
            return f"npu_add_rms_norm takes float16/bfloat16/float32, not {_dtype_name(dtype)}"
        if a.get("round_before_weight") and dtype != torch.float32:
            return ("npu_add_rms_norm multiplies by the weight in fp32 and rounds once (THUDM's RMSNorm); this node "
                    f"rounds the normalized value to {_dtype_name(dtype)} before the weight multiply (transformers' "
                    "glm/glm4), which the op cannot reproduce bit for bit")
        return self._product_refusal("npu_add_rms_norm", dtype=dtype)

    def add_rms_norm(self, ctx, node, inputs, params):
        res, branch = inputs
        gamma = params["weight"].to(branch.dtype)  # the op requires gamma's dtype to equal x's
        y, _, h = vendor().npu_add_rms_norm(branch, res, gamma, epsilon=float(node.attrs["eps"]))
        return (h, y) if node.attrs.get("emit_residual", True) else y

    # ------------------------------------------------------------------ rope: npu_apply_rotary_pos_emb
    def supports_apply_rotary_pos_emb(self, node) -> str | None:
        a = node.attrs
        kind, rd, hd = a["kind"], a["rotary_dim"], a["head_dim"]
        if kind == "interleaved":
            return ("npu_apply_rotary_pos_emb pairs dims half-split (NeoX, rotary_mode='half' is all A2/A3 run); "
                    f"this node rotates interleaved (GPT-J) pairs on {rd} of {hd} dims")
        width = hd // 2 if kind == "2d" else rd
        if kind == "half" and rd != hd:
            return f"npu_apply_rotary_pos_emb rotates the whole head; this node rotates {rd} of {hd} dims"
        if width not in (64, 128):
            return f"npu_apply_rotary_pos_emb needs a rotated width of 64 or 128, this node rotates {width}"
        dtype = node.input_specs[0].dtype
        if dtype not in FLOAT_DTYPES:
            return f"npu_apply_rotary_pos_emb takes float16/bfloat16/float32, not {_dtype_name(dtype)}"
        refusal = self._product_refusal("npu_apply_rotary_pos_emb", dtype=dtype)
        if refusal:
            return refusal
        # One call rotates q (num_heads) and k (num_kv_heads) of width `width` (2-D RoPE: the two
        # halves stacked on the batch axis, so the head counts stay those of the node).
        need = apply_rotary_pos_emb_ub_bytes(a["num_heads"], a["num_kv_heads"], width, dtype)
        ub = UB_BYTES[self.product.family]
        if need > ub:
            return (f"npu_apply_rotary_pos_emb needs {need} bytes of UB for {a['num_heads']}+{a['num_kv_heads']} "
                    f"heads of {width} dims in {_dtype_name(dtype)} (the documented ub_required formula), more than "
                    f"the {ub} bytes of an AI core on {self.product.describe()}")
        return None

    def rope_apply_rotary_pos_emb(self, ctx, node, inputs, params):
        """One fused in-place call for q and k, layout BSND; q/k are fresh contiguous copies.
        2-D RoPE: the two halves of every head are stacked on the batch axis, each half with its
        own table (position, block position), so one call rotates both."""
        a = node.attrs
        q, k, v = _split_qkv(inputs[0], a)  # (B, T, nh, hd), (B, T, nkv, hd)
        B = q.shape[0]
        if a["kind"] == "2d":
            half = a["head_dim"] // 2
            (c1, s1), (c2, s2) = rope_tables(ctx, a, q.dtype, "half")  # (B, T, half) each
            q2 = torch.cat((q[..., :half], q[..., half:]), dim=0)  # (2B, T, nh, half)
            k2 = torch.cat((k[..., :half], k[..., half:]), dim=0)
            cos = torch.cat((c1, c2), dim=0)[:, :, None, :].contiguous()  # (2B, T, 1, half)
            sin = torch.cat((s1, s2), dim=0)[:, :, None, :].contiguous()
            q2, k2 = vendor().npu_apply_rotary_pos_emb(q2, k2, cos, sin, layout="BSND",
                                                       **_mode_kwargs("npu_apply_rotary_pos_emb", "half"))
            return torch.cat((q2[:B], q2[B:]), dim=-1), torch.cat((k2[:B], k2[B:]), dim=-1), v
        cos, sin = rope_tables(ctx, a, q.dtype, "half")  # (B, T, hd)
        q, k = vendor().npu_apply_rotary_pos_emb(q.contiguous(), k.contiguous(), cos[:, :, None, :].contiguous(),
                                                 sin[:, :, None, :].contiguous(), layout="BSND",
                                                 **_mode_kwargs("npu_apply_rotary_pos_emb", "half"))
        return q, k, v

    # ------------------------------------------------------------------ rope: npu_rotary_mul
    def supports_rotary_mul(self, node) -> str | None:
        a = node.attrs
        kind, rd, hd = a["kind"], a["rotary_dim"], a["head_dim"]
        width = hd // 2 if kind == "2d" else rd
        heads = a["num_heads"] + a["num_kv_heads"]
        dtype = node.input_specs[0].dtype
        if dtype not in FLOAT_DTYPES:
            return f"npu_rotary_mul takes float16/bfloat16/float32, not {_dtype_name(dtype)}"
        mode = "interleave" if kind == "interleaved" else "half"
        refusal = self._product_refusal("npu_rotary_mul", dtype=dtype)
        if refusal:
            return refusal
        if self.product.family not in ROTARY_MUL_GENERAL:
            if mode == "interleave":
                return (f"npu_rotary_mul's 'interleave' mode is not on {self.product.describe()}: "
                        f"{ROTARY_MUL_INTERLEAVE_PATH}")
            if width != 128:
                return f"npu_rotary_mul on {self.product.describe()} needs D = 128, this node rotates {width} dims"
        if mode == "interleave":
            keywords = op_keywords("npu_rotary_mul")
            if keywords is not None and "rotary_mode" not in keywords:
                return ("this torch_npu's npu_rotary_mul has no rotary_mode argument (op-plugin 7.0.0 added it; "
                        "half-split pairing only)")
            if jit_compile_enabled() is True:
                return ("npu_rotary_mul's 'interleave' mode is not taken with jit_compile=True "
                        f"(torch.npu.set_compile_mode): {ROTARY_MUL_INTERLEAVE_PATH}")
        if width % 2 or width >= 896:
            return f"npu_rotary_mul needs an even rotated width below 896, this node rotates {width}"
        # The batch is folded into S (tables 1S1D), so B*N < 1000 reads N < 1000.
        if heads >= 1000:
            return f"npu_rotary_mul needs B*N < 1000; q and k together have {heads} heads"
        return None

    def rope_rotary_mul(self, ctx, node, inputs, params):
        """q and k heads together, rotary slice only, batch folded into the sequence axis:
        x (1, B*T, nh+nkv, d) with cos/sin (1, B*T, 1, d), the fully broadcast (1S1D) tables
        that 'interleave' mode requires. The untouched dims of a partial rotary are re-attached."""
        a = node.attrs
        qkv = inputs[0]
        hd, nh, nkv = a["head_dim"], a["num_heads"], a["num_kv_heads"]
        B, T = qkv.shape[:2]
        heads = nh + nkv
        qk = qkv[..., :heads * hd].unflatten(-1, (heads, hd))  # (B, T, nh+nkv, hd)
        v = qkv[..., heads * hd:].unflatten(-1, (nkv, hd))  # (B, T, nkv, hd)
        op = vendor().npu_rotary_mul
        if a["kind"] == "2d":
            half = hd // 2
            (c1, s1), (c2, s2) = rope_tables(ctx, a, qkv.dtype, "half")  # (B, T, half) each
            x = torch.stack((qk[..., :half], qk[..., half:])).reshape(1, 2 * B * T, heads, half)
            cos = torch.stack((c1, c2)).reshape(1, 2 * B * T, 1, half)
            sin = torch.stack((s1, s2)).reshape(1, 2 * B * T, 1, half)
            out = op(x, cos, sin, **_mode_kwargs("npu_rotary_mul", "half")).view(2, B, T, heads, half)
            rotated = torch.cat((out[0], out[1]), dim=-1)  # (B, T, nh+nkv, hd)
        else:
            rd = a["rotary_dim"]
            mode = "interleave" if a["kind"] == "interleaved" else "half"
            cos, sin = rope_tables(ctx, a, qkv.dtype, mode)  # (B, T, rd)
            x = qk[..., :rd].reshape(1, B * T, heads, rd)  # the rotary slice, contiguous copy
            out = op(x, cos.reshape(1, B * T, 1, rd), sin.reshape(1, B * T, 1, rd), **_mode_kwargs("npu_rotary_mul", mode))
            out = out.view(B, T, heads, rd)
            rotated = torch.cat((out, qk[..., rd:]), dim=-1) if rd < hd else out
        return rotated[:, :, :nh], rotated[:, :, nh:], v

    # ------------------------------------------------------------------ activation: npu_swiglu
    def supports_swiglu(self, node) -> str | None:
        kind = node.attrs.get("kind")
        if kind != "swiglu":
            return f"npu_swiglu computes silu(first half) * second half; this node's activation is {kind}"
        dtype = node.input_specs[0].dtype
        if dtype not in FLOAT_DTYPES:
            return f"npu_swiglu takes float16/bfloat16/float32, not {_dtype_name(dtype)}"
        if node.input_specs[0].shape[-1] % 2:
            return f"npu_swiglu halves the last dim; {node.input_specs[0].shape[-1]} is odd"
        return self._product_refusal("npu_swiglu", dtype=dtype)

    def swiglu(self, ctx, node, inputs, params):
        return vendor().npu_swiglu(inputs[0].contiguous(), dim=-1)  # the op refuses non-contiguous input

    # ------------------------------------------------------------------ attention: FIA
    def supports_fused_infer_attention(self, node) -> str | None:
        a = node.attrs
        if a.get("scaling") != "standard":
            return ("npu_fused_infer_attention_score computes softmax(scale * q k^T) with one scale; "
                    f"{a.get('scaling')} attention (GLM-130B/ChatGLM-6B: q / (sqrt(d) * (layer+1)), scores in fp16 "
                    "with -10000 fill, softmax of scores * (layer+1)) cannot be expressed")
        if a.get("per_row_cache"):
            return ("per-row cache positions (the serving engine's batched decode): this wrapper writes the cache "
                    "at one position for the whole batch and passes one kv length; not built for rows at different "
                    "lengths")
        dtype = node.input_specs[0].dtype
        if dtype not in HALF_DTYPES:
            return f"npu_fused_infer_attention_score takes float16/bfloat16 queries, not {_dtype_name(dtype)}"
        hd, nh, nkv = a["head_dim"], a["num_heads"], a["num_kv_heads"]
        if hd % 16 or hd > 512:
            return f"npu_fused_infer_attention_score needs head_dim a multiple of 16 and at most 512, got {hd}"
        if nh > 256:
            return f"npu_fused_infer_attention_score takes at most 256 query heads, got {nh}"
        if nh % nkv or nh // nkv > 64:
            return f"npu_fused_infer_attention_score needs num_heads/num_key_value_heads an integer <= 64, got {nh}/{nkv}"
        if nh * hd >= 65535:  # prefill without a cache passes layout BSND
            return f"npu_fused_infer_attention_score in layout BSND needs N*D < 65535, got {nh}*{hd}"
        return self._product_refusal("npu_fused_infer_attention_score", dtype=dtype)

    def fused_infer_attention(self, ctx, node, inputs, params):
        """Prefill and decode through npu_fused_infer_attention_score with an explicit mask
        (sparse_mode 0, True = masked: glmrt's `allowed` inverted) and scale = 1/sqrt(d).

        Without a cache: layout BSND on this step's q, k, v. With a cache: the step's keys and
        values are written by glmrt.ops.update_kv_cache (the one cache write every attention kernel
        shares: at ctx.cache_pos in eager decode, at the device position ctx.cache_pos_t in static
        and graph decode), then the op reads the whole contiguous cache buffer (B, nkv, max_len, hd)
        in layout BNSD. Eager: actual_seq_lengths_kv = cache_pos + T and the mask padded (masked) up
        to max_len. Static/graph: nothing read from the host -- ctx.allowed already spans max_len
        (built on the device from the position), so the call is the same at every step and can be
        captured."""
        a = node.attrs
        q, k, v = inputs  # (B, T, nh, hd), (B, T, nkv, hd), (B, T, nkv, hd)
        B, T, nh, hd = q.shape
        nkv = a["num_kv_heads"]
        kwargs = dict(num_heads=nh, num_key_value_heads=nkv, sparse_mode=0,
                      pre_tokens=2147483647, next_tokens=2147483647,
                      # Q_S > 1: high precision with row-invalid correction (fully masked rows, the
                      # left padding, give zeros), as documented for user masks; Q_S = 1 takes 0/1.
                      inner_precise=2 if T > 1 else 0)
        kwargs[self._fia_scale_keyword()] = float(a["scale"])
        if ctx.cache is None:
            mask = (~ctx.allowed).contiguous()  # (B, 1, T, T), True = masked
            out, _ = vendor().npu_fused_infer_attention_score(
                q.contiguous(), k.contiguous(), v.contiguous(), atten_mask=mask, input_layout="BSND", **kwargs)
            return out.reshape(B, T, nh * hd)  # (B, T, nh, hd) -> (B, T, H)
        layer = a["layer_index"]
        ops.update_kv_cache(ctx, layer, k, v)
        k_cache, v_cache = ctx.cache.k[layer], ctx.cache.v[layer]  # (B, nkv, max_len, hd), contiguous
        max_len = k_cache.shape[2]
        if ctx.cache_pos_t is not None:  # static shapes: allowed is (B, 1, T, max_len)
            mask = (~ctx.allowed).contiguous()
        else:
            S = ctx.cache_pos + T
            kwargs["actual_seq_lengths_kv"] = [S] * B
            mask_key = ("npu.fia_mask", max_len)
            mask = ctx.memo.get(mask_key)
            if mask is None:  # shared by every layer of this step
                mask = torch.ones(B, 1, T, max_len, dtype=torch.bool, device=q.device)
                mask[..., :S] = ~ctx.allowed
                ctx.memo[mask_key] = mask
        out, _ = vendor().npu_fused_infer_attention_score(
            q.transpose(1, 2).contiguous(), k_cache, v_cache, atten_mask=mask, input_layout="BNSD", **kwargs)
        return out.transpose(1, 2).reshape(B, T, nh * hd)  # (B, nh, T, hd) -> (B, T, H)

    @staticmethod
    def _fia_scale_keyword() -> str:
        """op-plugin renamed `scale_value` (torch_npu 6.0.x releases) to `scale`; both default to
        1.0, so passing the wrong name would be a TypeError at best and no scaling at worst."""
        keywords = op_keywords("npu_fused_infer_attention_score")
        if keywords is not None and keywords is not _MISSING and "scale" not in keywords \
                and "scale_value" in keywords:
            return "scale_value"
        return "scale"

    # ------------------------------------------------------------------ linear: weight-only quantized
    def supports_weight_quant_matmul(self, node) -> str | None:
        q = node.attrs.get("quant")
        if q is None:
            return "npu_weight_quant_batchmatmul is for weight-only quantized linears; this one is not quantized"
        dtype = node.input_specs[0].dtype
        if dtype not in HALF_DTYPES:
            return f"npu_weight_quant_batchmatmul takes float16/bfloat16 activations, not {_dtype_name(dtype)}"
        k, n = q["in_features"], node.attrs["out_features"]
        if not (1 <= k <= 65535 and 1 <= n <= 65535):
            return f"npu_weight_quant_batchmatmul needs K and N in [1, 65535], got K={k}, N={n}"
        g = q["group_size"]
        if g and (g % 32 or not 32 <= g <= k - 1):
            return f"npu_weight_quant_batchmatmul needs a group size that is a multiple of 32 in [32, K-1]; got {g} (K={k})"
        if q["bits"] == 4:
            if n % 8:
                return f"int4 weights are packed 8 per int32 along N; N={n} is not a multiple of 8"
            refusal = self._product_refusal("npu_convert_weight_to_int4pack")
            if refusal:
                return refusal
        elif q["bits"] != 8:
            return f"{q['bits']}-bit weights: npu_weight_quant_batchmatmul takes int8 or int4"
        refusal = self._product_refusal("npu_weight_quant_batchmatmul", dtype=dtype)
        if refusal is None and self.product.family == INFERENCE:
            if dtype != torch.float16:
                return f"npu_weight_quant_batchmatmul takes float16 activations only on {self.product.describe()}"
            if g:
                return (f"npu_weight_quant_batchmatmul has per-tensor/per-channel scales only on "
                        f"{self.product.describe()}; this node has groups of {g}")
        return refusal

    def weight_quant_matmul(self, ctx, node, inputs, params):
        """y = x @ ((W + 0) * scale) + bias with W (K, N): INT8 is glmrt's (N, K) weight transposed
        (a view; the op prefers the transposed weight for per-channel scales), INT4 the int32 pack
        made once from glmrt's bytes by npu_convert_weight_to_int4pack."""
        q = node.attrs["quant"]
        x = inputs[0]
        k = q["in_features"]
        x2 = x.reshape(-1, k)  # the op takes 2-D activations (M, K)
        if q["bits"] == 8:
            weight = params["weight"].t()  # (N, K) int8 -> (K, N) view
        else:
            weight = self.int4_cache.get(params["weight"], k)  # (K, N/8) int32
        y = vendor().npu_weight_quant_batchmatmul(
            x2, weight, antiquant_scale(params["scale"], q["group_size"], x.dtype, weight_transposed=q["bits"] == 8),
            bias=bias_for(x.dtype, params.get("bias")), antiquant_group_size=q["group_size"])
        return y.reshape(*x.shape[:-1], y.shape[-1])  # (B, T, N)

    # ------------------------------------------------------------------ torch ops on the npu device
    @staticmethod
    def supports_plain_linear(node) -> str | None:
        if "quant" in node.attrs:
            return "weight-only quantized: npu_weight_quant_batchmatmul's node"
        return None

    def kernel_list(self) -> list[Kernel]:
        return [
            Kernel("norm", "torch_npu.npu_rms_norm", VENDOR, self.rms_norm, self.supports_rms_norm),
            Kernel("residual_norm", "torch_npu.npu_add_rms_norm", VENDOR, self.add_rms_norm,
                   self.supports_add_rms_norm),
            Kernel("rope", "torch_npu.npu_apply_rotary_pos_emb", VENDOR, self.rope_apply_rotary_pos_emb,
                   self.supports_apply_rotary_pos_emb),
            Kernel("rope", "torch_npu.npu_rotary_mul", VENDOR, self.rope_rotary_mul, self.supports_rotary_mul),
            Kernel("activation", "torch_npu.npu_swiglu", VENDOR, self.swiglu, self.supports_swiglu),
            Kernel("attention", "torch_npu.npu_fused_infer_attention_score", VENDOR, self.fused_infer_attention,
                   self.supports_fused_infer_attention),
            # torch's own ops dispatch to CANN's kernels on the npu device.
            Kernel("linear", "torch-npu.linear", VENDOR, ops.linear, self.supports_plain_linear),
            Kernel("linear", "torch_npu.npu_weight_quant_batchmatmul", VENDOR, self.weight_quant_matmul,
                   self.supports_weight_quant_matmul),
            Kernel("embedding", "torch-npu.embedding", VENDOR, ops.embedding),
            Kernel("residual", "torch-npu.residual", VENDOR, ops.residual),
            Kernel("lm_head", "torch-npu.lm_head", VENDOR, ops.lm_head),
        ]


__all__ = ["vendor", "loaded_vendor", "NPUKernels", "Product", "detect_product", "int4_values_kn", "antiquant_scale",
           "bias_for", "product_family", "FIA_MASK_POLARITY_CHECK", "product_dtypes", "OP_PRODUCTS", "BF16_PRODUCTS"]
