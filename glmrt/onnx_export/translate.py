"""The ONNX lowering of the GLM graph: one translation per IR op, for both flavors.

This module is to the graph what a backend is to the plan. ``TRANSLATIONS`` maps every IR op
(``glmrt.graph.OPS``) to the function that writes its ONNX nodes; each function reads the node's
attributes and shapes, and the flavor decides which ONNX ops express it:

    op              ort (opset 21 + com.microsoft 1)            standard (opset 23, ai.onnx only)
    embedding       Gather                                      Gather
    norm            LayerNormalization; RMSNorm decomposed      LayerNormalization; RMSNormalization
                    (onnxruntime fuses it into its
                    SimplifiedLayerNormalization, which
                    onnx.checker rejects in ai.onnx)
    residual_norm   SkipSimplifiedLayerNormalization /          Add + the norm
                    SkipLayerNormalization
    linear          Gemm (transB); INT4/INT8: MatMulNBits       Gemm (transB); INT4/INT8: blocked
                                                                DequantizeLinear + MatMul
    rope            com.microsoft RotaryEmbedding               RotaryEmbedding-23
                    (interleaved / half, partial rotary; 2-D RoPE: two half-head rotations)
    attention       GroupQueryAttention (causal mask,           Attention-23 (float mask, is_causal 0)
                    1/sqrt(d) scaling); otherwise decomposed    or decomposed (layer-scaled)
    activation      Sigmoid/Mul (SwiGLU), Gelu-20               same
    residual        Add (Mul by alpha for DeepNorm)             same
    lm_head         Gemm (transB) + Cast to float32             same

A node a flavor cannot express raises ExportError naming the node and the op, before any file
is finished. The masks (causal, and the bidirectional prefix up to <sop>) are computed once in
the graph from ``attention_mask``, ``input_ids`` and the past length, and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from onnx import TensorProto

from ..graph import Graph, Node
from ..ops import rope_tables
from . import packing
from .builder import ONNX_DTYPE, OnnxBuilder
from .flavors import ExportError, Flavor


FLOAT = TensorProto.FLOAT


@dataclass
class Lowering:
    """State shared by the translations while one graph is written."""

    b: OnnxBuilder
    flavor: Flavor
    graph: Graph
    weights: dict[str, torch.Tensor]
    accuracy_level: int
    use_gqa: bool
    env: dict[str, str] = field(default_factory=dict)  # IR value -> ONNX value
    memo: dict = field(default_factory=dict)
    quant_blocks: dict = field(default_factory=dict)  # node name -> block size used (for the manifest)

    @property
    def cfg(self):
        return self.graph.config

    @property
    def dtype(self) -> torch.dtype:
        return self.graph.dtype

    @property
    def elem(self) -> int:
        return ONNX_DTYPE[self.dtype]

    def param(self, node: Node, role: str, tensor: torch.Tensor | None = None) -> str:
        """The initializer of one of the node's parameters (written once, shared by name)."""
        name = node.params[role]
        if name not in self.memo:
            self.memo[name] = self.b.weight(name, self.weights[name] if tensor is None else tensor)
        return self.memo[name]

    def fconst(self, value: float, dtype: torch.dtype | None = None) -> str:
        """A scalar constant in ``dtype`` (default: the model dtype), stored as an initializer."""
        dtype = dtype or self.dtype
        key = ("scalar", float(value), dtype)
        if key not in self.memo:
            t = torch.tensor(value, dtype=dtype)
            if dtype == torch.bfloat16:
                self.memo[key] = self.b.weight(self.b.fresh("const.bf16"), t)
            else:
                self.memo[key] = self.b.const(t.numpy(), dtype=t.numpy().dtype)
        return self.memo[key]

    def cast(self, x: str, to: int, hint: str) -> str:
        """Cast between the model dtype and float32 (callers only cast across the two); nothing
        to do in a float32 model."""
        return x if self.elem == FLOAT else self.b.op("Cast", [x], hint, to=to)

    def fail(self, node: Node, why: str) -> None:
        raise ExportError(f"the {self.flavor.name!r} ONNX flavor cannot express node {node.name} (op "
                          f"{node.op!r}, {node.describe()}): {why}")

    # ------------------------------------------------------------------ shared shape values
    def shape_tail(self, n: int) -> str:
        """[B, S, n] as an int64 vector (the target shape of a Reshape back to 3-D)."""
        key = ("bsn", n)
        if key not in self.memo:
            self.memo[key] = self.b.op("Concat", [self.memo["bs"], self.b.const([n])], f"shape.bs{n}", axis=0)
        return self.memo[key]


# ============================================================================ prologue
def prologue(L: Lowering) -> None:
    """Graph inputs, and the values every layer shares: [B, S], the past length, the masks."""
    b, cfg = L.b, L.cfg
    ids = b.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = b.input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
    pos_shape = ["batch", 2, "sequence"] if cfg.rope_kind == "2d" else ["batch", "sequence"]
    b.input("position_ids", TensorProto.INT64, pos_shape)
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            b.input(f"past_key_values.{i}.{kind}", L.elem, ["batch", cfg.num_kv_heads, "past_sequence", cfg.head_dim])
    L.env["input_ids"] = ids

    ids_shape = b.op("Shape", [ids], "shape.ids")
    L.memo["bs"] = ids_shape  # [B, S]
    seq1 = b.op("Slice", [ids_shape, b.const([1]), b.const([2])], "seq_len")       # [1]
    total1 = b.op("Slice", [b.op("Shape", [mask], "shape.mask"), b.const([1]), b.const([2])], "total_len")
    past1 = b.op("Sub", [total1, seq1], "past_len")                                 # [1]
    zero, one = b.const(0), b.const(1)
    past = b.op("Squeeze", [past1, b.const([0])], "past")
    total = b.op("Squeeze", [total1, b.const([0])], "total")
    q_abs = b.op("Range", [past, total, one], "query_index")                        # [S]
    k_idx = b.op("Range", [zero, total, one], "key_index")                          # [T]
    causal = b.op("LessOrEqual", [b.op("Unsqueeze", [k_idx, b.const([0])]),         # [S, T]
                                  b.op("Unsqueeze", [q_abs, b.const([1])])], "causal")
    key_valid = b.op("Cast", [mask], "key_valid", to=TensorProto.BOOL)              # [B, T]
    allowed = b.op("And", [causal, b.op("Unsqueeze", [key_valid, b.const([1, 2])])], "allowed")  # [B, 1, S, T]
    if cfg.mask_kind == "prefix":
        # Keys before <sop> are visible to every query (GLM-130B, ChatGLM-6B). <sop> is found in this
        # step's real tokens; a step without it (decode) needs no prefix: its queries stand after <sop>.
        step_mask = b.op("Slice", [mask, past1, total1, b.const([1])], "step_mask")  # [B, S]
        hit = b.op("And", [b.op("Equal", [ids, b.const(cfg.sop_token_id)]),
                           b.op("Cast", [step_mask], to=TensorProto.BOOL)], "is_sop")
        hit_i = b.op("Cast", [hit], to=TensorProto.INT32)
        first = b.op("ArgMax", [hit_i], "sop_in_step", axis=1, keepdims=0)          # [B]
        has = b.op("Cast", [b.op("ReduceMax", [hit_i, b.const([1])], keepdims=0)], to=TensorProto.BOOL)
        sop_abs = b.op("Where", [has, b.op("Add", [first, past]), zero], "sop_index")  # [B]
        prefix = b.op("And", [b.op("Less", [b.op("Unsqueeze", [k_idx, b.const([0])]),
                                            b.op("Unsqueeze", [sop_abs, b.const([1])])]), key_valid], "prefix")
        allowed = b.op("Or", [allowed, b.op("Unsqueeze", [prefix, b.const([1, 2])])], "allowed_prefix")
    L.memo["allowed"] = allowed  # bool [B, 1, S, T]
    L.memo["total"] = total
    if cfg.rope_kind == "2d":
        L.memo["pos"] = b.op("Gather", ["position_ids", b.const(0)], "positions", axis=1)
        L.memo["block_pos"] = b.op("Gather", ["position_ids", b.const(1)], "block_positions", axis=1)
    else:
        L.memo["pos"] = "position_ids"


def additive_mask(L: Lowering) -> str:
    """The mask as a float bias [B, 1, S, T]: 0 where allowed, the dtype's lowest value elsewhere
    (finite, so a query row with no visible key -- a padding position -- stays finite)."""
    if "bias" not in L.memo:
        low = torch.finfo(L.dtype).min
        L.memo["bias"] = L.b.op("Where", [L.memo["allowed"], L.fconst(0.0), L.fconst(low)], "attention_bias")
    return L.memo["bias"]


# ============================================================================ per-op translations
def t_embedding(L: Lowering, node: Node, x: list[str]) -> str:
    return L.b.op("Gather", [L.param(node, "weight"), x[0]], node.name, axis=0)  # (B, S, H)


def _rms_decomposed(L: Lowering, x: str, weight: str, eps: float, round_before_weight: bool, hint: str) -> str:
    b = L.b
    xf = L.cast(x, FLOAT, f"{hint}.x_f32")
    var = b.op("ReduceMean", [b.op("Mul", [xf, xf]), b.const([-1])], f"{hint}.variance", keepdims=1)
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, L.fconst(eps, torch.float32)])])], f"{hint}.rsqrt")
    normed = b.op("Mul", [xf, inv], f"{hint}.normed")
    if round_before_weight:  # transformers glm/glm4: round to the model dtype, then the weight multiply
        return b.op("Mul", [weight, L.cast(normed, L.elem, f"{hint}.normed_cast")], hint)
    w = weight if L.elem == FLOAT else b.op("Cast", [weight], f"{hint}.weight_f32", to=FLOAT)
    return L.cast(b.op("Mul", [w, normed], f"{hint}.scaled"), L.elem, hint)  # THUDM: fp32 product, one rounding


def _norm(L: Lowering, node: Node, x: str) -> str:
    a = node.attrs
    b = L.b
    if a["kind"] == "layernorm":
        return b.op("LayerNormalization", [x, L.param(node, "weight"), L.param(node, "bias")], node.name,
                    axis=-1, epsilon=float(a["eps"]))
    weight = L.param(node, "weight")
    # RMSNormalization rounds the normalized value to the input dtype before the weight multiply:
    # exact for float32 and for round_before_weight models; the others get the decomposition.
    if L.flavor.name == "standard" and (L.dtype == torch.float32 or a["round_before_weight"]):
        return b.op("RMSNormalization", [x, weight], node.name, axis=-1, epsilon=float(a["eps"]), stash_type=1)
    return _rms_decomposed(L, x, weight, float(a["eps"]), a["round_before_weight"], node.name)


def t_norm(L: Lowering, node: Node, x: list[str]) -> str:
    return _norm(L, node, x[0])


def _residual_sum_input(L: Lowering, node: Node, res: str) -> str:
    alpha = float(node.attrs["alpha"])
    return res if alpha == 1.0 else L.b.op("Mul", [res, L.fconst(alpha)], f"{node.name}.scaled_residual")


def t_residual(L: Lowering, node: Node, x: list[str]) -> str:
    res, branch = x
    return L.b.op("Add", [branch, _residual_sum_input(L, node, res)], node.name)  # branch + alpha * residual


def t_residual_norm(L: Lowering, node: Node, x: list[str]):
    res, branch = x
    a = node.attrs
    emit = a.get("emit_residual", True)
    out_names = node.outputs
    if L.flavor.name == "ort" and (a["kind"] == "layernorm" or L.dtype == torch.float32 or a["round_before_weight"]):
        skip = _residual_sum_input(L, node, res)  # branch + alpha * residual, as the reference adds
        if a["kind"] == "rmsnorm":
            op, ins = "SkipSimplifiedLayerNormalization", [branch, skip, L.param(node, "weight")]
        else:
            op, ins = "SkipLayerNormalization", [branch, skip, L.param(node, "weight"), L.param(node, "bias")]
        y = L.b.fresh(out_names[-1])
        outs = [y, "", "", L.b.fresh(out_names[0])] if emit else [y]
        result = L.b.op(op, ins, node.name, outputs=outs, domain="com.microsoft", epsilon=float(a["eps"]))
        return (result[3], result[0]) if emit else result  # (h, norm(h)) in the IR's output order
    h = t_residual(L, node, x)
    y = _norm(L, node, h)
    return (h, y) if emit else y


def t_linear(L: Lowering, node: Node, x: list[str]) -> str:
    b = L.b
    n, k = node.attrs["out_features"], node.attrs["in_features"]
    q = node.attrs.get("quant")
    bias = L.param(node, "bias") if "bias" in node.params else None
    after = bias is not None and node.attrs.get("bias_after_matmul", False)  # GLM-130B: round, then + bias
    if q is None:
        flat = b.op("Reshape", [x[0], b.const([-1, k])], f"{node.name}.rows")
        y = b.op("Gemm", [flat, L.param(node, "weight")] + ([bias] if bias and not after else []),
                 f"{node.name}.gemm", transB=1)
        if after:
            y = b.op("Add", [y, bias], f"{node.name}.bias")
        return b.op("Reshape", [y, L.shape_tail(n)], node.name)  # (B, S, N)
    bits, group = q["bits"], q["group_size"]
    values = packing.signed_values(L.weights[node.params["weight"]], bits, k)  # (N, K) int8
    scale = L.weights[node.params["scale"]]
    wname = node.params["weight"]
    if L.flavor.name == "ort":
        block = packing.block_size_for(group, k)
        if block is None:
            L.fail(node, f"MatMulNBits needs a block size that is a power of two >= 16; this weight has one "
                         f"scale per {group} input columns, which no such block divides. Export with "
                         f"--flavor standard (blocked DequantizeLinear takes any block), or quantize the float "
                         f"checkpoint with --quantize int{bits}-g32/-g64/-g128")
        packed = torch.from_numpy(packing.pack_matmulnbits(values, bits, block))
        scales = packing.block_scales(scale, group, k, block).to(L.dtype)
        y = b.op("MatMulNBits", [x[0], b.weight(f"{wname}.matmulnbits", packed), b.weight(f"{scale_name(node)}", scales)],
                 f"{node.name}.matmul", domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                 accuracy_level=L.accuracy_level)
    else:
        block = group if group else packing.block_size_for(0, k)  # blocked DQ takes any block size
        scales_t = packing.block_scales(scale, group, k, block).t().contiguous().to(L.dtype)  # (ceil(K / block), N)
        if bits == 4:
            raw = torch.from_numpy(packing.pack_onnx_int4(values.T))
            wq = b.weight(f"{wname}.int4_kn", raw, elem_type=TensorProto.INT4, dims=[k, n])
        else:
            wq = b.weight(f"{wname}.int8_kn", torch.from_numpy(np.ascontiguousarray(values.T)))
        w = b.op("DequantizeLinear", [wq, b.weight(scale_name(node), scales_t)], f"{node.name}.dequantized",
                 axis=0, block_size=block)
        y = b.op("MatMul", [x[0], w], f"{node.name}.matmul")
    L.quant_blocks[node.name] = block
    return b.op("Add", [y, bias], node.name) if bias else y


def scale_name(node: Node) -> str:
    return node.params["scale"] + ".blocks"


def _rope_cache(L: Lowering, rotary_dim: int, base: float, table_dtype: str) -> tuple[str, str]:
    """cos/sin caches (max_positions, rotary_dim / 2) built by glmrt.ops.rope_tables, so their
    values are the reference's own (fp16 angle arithmetic for ChatGLM-6B / GLM-130B included)."""
    key = ("rope", rotary_dim, base, table_dtype)
    if key not in L.memo:
        positions = torch.arange(L.cfg.max_positions)[None]  # (1, P)
        cos, sin = rope_tables(positions, rotary_dim, base, L.dtype, table_dtype)
        tag = f"rope.{rotary_dim}.{table_dtype}"
        L.memo[key] = (L.b.weight(f"{tag}.cos_cache", cos[0].contiguous()),
                       L.b.weight(f"{tag}.sin_cache", sin[0].contiguous()))
    return L.memo[key]


def _rotate(L: Lowering, x3: str, heads: int, positions: str, cos: str, sin: str, interleaved: bool,
            rotary_dim: int, head_dim: int, hint: str) -> str:
    """RoPE on a (B, S, heads * head_dim) tensor."""
    attrs = {"interleaved": int(interleaved), "num_heads": heads}
    if rotary_dim != head_dim:
        attrs["rotary_embedding_dim"] = rotary_dim
    if L.flavor.name == "ort":
        return L.b.op("RotaryEmbedding", [x3, positions, cos, sin], hint, domain="com.microsoft", **attrs)
    return L.b.op("RotaryEmbedding", [x3, cos, sin, positions], hint, **attrs)


def t_rope(L: Lowering, node: Node, x: list[str]):
    b, a = L.b, node.attrs
    hd, nh, nkv = a["head_dim"], a["num_heads"], a["num_kv_heads"]
    q, k, v = b.op("Split", [x[0], b.const([nh * hd, nkv * hd, nkv * hd])], f"{node.name}.qkv", n_out=3, axis=-1)
    if a["kind"] == "2d":
        # ChatGLM-6B: each head's first half rotated by position, second half by block position,
        # both with NeoX pairing over the full half.
        half = hd // 2
        cos, sin = _rope_cache(L, half, a["base"], a["table_dtype"])

        def rot2d(t: str, heads: int, tag: str) -> str:
            parts = b.op("Reshape", [t, b.const([0, 0, heads, 2, half])], f"{tag}.halves")
            first, second = b.op("Split", [parts, b.const([1, 1])], f"{tag}.half", n_out=2, axis=3)
            flat = [b.op("Reshape", [p, L.shape_tail(heads * half)], f"{tag}.h{i}") for i, p in enumerate((first, second))]
            r1 = _rotate(L, flat[0], heads, L.memo["pos"], cos, sin, False, half, half, f"{tag}.rot_position")
            r2 = _rotate(L, flat[1], heads, L.memo["block_pos"], cos, sin, False, half, half, f"{tag}.rot_block")
            shaped = [b.op("Reshape", [r, b.const([0, 0, heads, 1, half])]) for r in (r1, r2)]
            return b.op("Reshape", [b.op("Concat", shaped, axis=3), b.const([0, 0, heads, hd])], tag)

        return rot2d(q, nh, node.outputs[0]), rot2d(k, nkv, node.outputs[1]), \
            b.op("Reshape", [v, b.const([0, 0, nkv, hd])], node.outputs[2])
    rd = a["rotary_dim"]
    cos, sin = _rope_cache(L, rd, a["base"], a["table_dtype"])
    interleaved = a["kind"] == "interleaved"
    qr = _rotate(L, q, nh, L.memo["pos"], cos, sin, interleaved, rd, hd, f"{node.outputs[0]}.rotated")
    kr = _rotate(L, k, nkv, L.memo["pos"], cos, sin, interleaved, rd, hd, f"{node.outputs[1]}.rotated")
    return (b.op("Reshape", [qr, b.const([0, 0, nh, hd])], node.outputs[0]),
            b.op("Reshape", [kr, b.const([0, 0, nkv, hd])], node.outputs[1]),
            b.op("Reshape", [v, b.const([0, 0, nkv, hd])], node.outputs[2]))  # (B, S, heads, hd)


def t_attention(L: Lowering, node: Node, x: list[str]) -> str:
    b, a = L.b, node.attrs
    q, k, v = x  # (B, S, nh, hd), (B, S, nkv, hd) x2
    i, nh, nkv, hd = a["layer_index"], a["num_heads"], a["num_kv_heads"], a["head_dim"]
    past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    present_k, present_v = f"present.{i}.key", f"present.{i}.value"
    for name in (present_k, present_v):
        b.output(name, L.elem, ["batch", nkv, "total_sequence", hd])
    standard_scaling = a["scaling"] == "standard"

    if L.flavor.name == "ort" and L.use_gqa and standard_scaling and a["mask_kind"] == "causal":
        # GroupQueryAttention: causal inside the op; left padding through attention_bias, with every
        # row's seqlens_k = total - 1 (GQA reads a row's keys as [0, seqlens_k]).
        if "seqlens" not in L.memo:
            total_i32 = b.op("Cast", [L.memo["total"]], "total_i32", to=TensorProto.INT32)
            batch = b.op("Slice", [L.memo["bs"], b.const([0]), b.const([1])], "batch")
            L.memo["seqlens"] = b.op("Expand", [b.op("Sub", [total_i32, b.const(1, np.int32)]), batch], "seqlens_k")
            L.memo["total_i32"] = total_i32
        flat = [b.op("Reshape", [t, L.shape_tail(h * hd)], f"{node.name}.{n}3d") for t, h, n in
                ((q, nh, "q"), (k, nkv, "k"), (v, nkv, "v"))]
        y, _, _ = b.op("GroupQueryAttention", flat + [past_k, past_v, L.memo["seqlens"], L.memo["total_i32"], "", "", "",
                                                       additive_mask(L)],
                       node.name, outputs=[b.fresh(node.name), present_k, present_v], domain="com.microsoft",
                       num_heads=nh, kv_num_heads=nkv, scale=float(a["scale"]))
        return y  # (B, S, nh * hd)

    qt = b.op("Transpose", [q], f"{node.name}.q_heads", perm=[0, 2, 1, 3])  # (B, nh, S, hd)
    kt = b.op("Transpose", [k], f"{node.name}.k_heads", perm=[0, 2, 1, 3])  # (B, nkv, S, hd)
    vt = b.op("Transpose", [v], f"{node.name}.v_heads", perm=[0, 2, 1, 3])
    if L.flavor.name == "standard" and standard_scaling:
        y, _, _ = b.op("Attention", [qt, kt, vt, additive_mask(L), past_k, past_v], node.name,
                       outputs=[b.fresh(f"{node.name}.heads"), present_k, present_v], is_causal=0,
                       scale=float(a["scale"]), softmax_precision=FLOAT)
        y = b.op("Transpose", [y], f"{node.name}.tokens", perm=[0, 2, 1, 3])  # (B, S, nh, hd)
        return b.op("Reshape", [y, L.shape_tail(nh * hd)], node.name)

    # Decomposed, exactly the reference's arithmetic (glmrt.ops.attention). Query head h reads KV
    # group h // g: the queries are viewed as (B, nkv, g, S, hd) against keys (B, nkv, 1, T, hd).
    g = nh // nkv
    keys = b.op("Concat", [past_k, kt], outputs=[present_k], axis=2)      # (B, nkv, T, hd)
    values = b.op("Concat", [past_v, vt], outputs=[present_v], axis=2)
    q5 = b.op("Reshape", [qt, b.const([0, nkv, g, -1, hd])], f"{node.name}.q_groups")
    k5 = b.op("Unsqueeze", [keys, b.const([2])], f"{node.name}.k_groups")
    v5 = b.op("Unsqueeze", [values, b.const([2])], f"{node.name}.v_groups")
    k5t = b.op("Transpose", [k5], f"{node.name}.k_t", perm=[0, 1, 2, 4, 3])
    allowed5 = L.memo.get("allowed5")
    if allowed5 is None:
        allowed5 = L.memo["allowed5"] = b.op("Unsqueeze", [L.memo["allowed"], b.const([1])], "allowed_groups")
    if standard_scaling:
        # ChatGLM2/3, GLM-4 (SDPA in the original code): fp32 inside, the output rounded once.
        qf = L.cast(q5, FLOAT, f"{node.name}.q_f32")
        kf = L.cast(k5t, FLOAT, f"{node.name}.k_f32")
        scores = b.op("Mul", [b.op("MatMul", [qf, kf]), L.fconst(float(a["scale"]), torch.float32)],
                      f"{node.name}.scores")
        masked = b.op("Where", [allowed5, scores, L.fconst(torch.finfo(torch.float32).min, torch.float32)],
                      f"{node.name}.masked")
        # As SDPA's flash kernels: exp(score - max) rounded to the model dtype for the product with
        # V, divided by the fp32 sum of the exps (glmrt.ops.attention).
        peak = b.op("ReduceMax", [masked, b.const([-1])], f"{node.name}.max", keepdims=1)  # opset >= 18
        e = b.op("Exp", [b.op("Sub", [masked, peak], f"{node.name}.shifted")], f"{node.name}.exp")
        total = b.op("ReduceSum", [e, b.const([-1])], f"{node.name}.sum", keepdims=1)
        if L.elem != FLOAT:
            e = L.cast(L.cast(e, L.elem, f"{node.name}.exp_rounded"), FLOAT, f"{node.name}.exp_f32")
        weighted = b.op("MatMul", [e, L.cast(v5, FLOAT, f"{node.name}.v_f32")], f"{node.name}.weighted")
        out = L.cast(b.op("Div", [weighted, total], f"{node.name}.context_f32"), L.elem, f"{node.name}.context")
    else:
        # GLM-130B / ChatGLM-6B: q / (sqrt(hd) * c), -10000 fill, softmax(scores.float() * c).
        c = float(a["layer_index"] + 1)
        qs = b.op("Div", [q5, L.fconst(hd ** 0.5 * c)], f"{node.name}.q_scaled")
        scores = b.op("MatMul", [qs, k5t], f"{node.name}.scores")
        masked = b.op("Where", [allowed5, scores, L.fconst(-10000.0)], f"{node.name}.masked")
        scaled = b.op("Mul", [L.cast(masked, FLOAT, f"{node.name}.scores_f32"), L.fconst(c, torch.float32)])
        probs = b.op("Softmax", [scaled], f"{node.name}.probs", axis=-1)
        out = b.op("MatMul", [L.cast(probs, L.elem, f"{node.name}.probs_cast"), v5], f"{node.name}.context")
    out = b.op("Reshape", [out, b.const([0, nh, -1, hd])], f"{node.name}.context_heads")  # (B, nh, S, hd)
    out = b.op("Transpose", [out], f"{node.name}.context_tokens", perm=[0, 2, 1, 3])
    return b.op("Reshape", [out, L.shape_tail(nh * hd)], node.name)  # (B, S, nh * hd)


def t_activation(L: Lowering, node: Node, x: list[str]) -> str:
    b, kind = L.b, node.attrs["kind"]
    if kind == "gelu_tanh":  # ChatGLM-6B
        return b.op("Gelu", [x[0]], node.name, approximate="tanh")
    first, second = b.op("Split", [x[0]], f"{node.name}.halves", n_out=2, axis=-1, num_outputs=2)
    if kind == "swiglu":  # silu(first half) * second half
        silu = b.op("Mul", [first, b.op("Sigmoid", [first])], f"{node.name}.silu")
        return b.op("Mul", [silu, second], node.name)
    if kind == "geglu":  # GLM-130B: first half * gelu(second half), erf GELU
        return b.op("Mul", [first, b.op("Gelu", [second], f"{node.name}.gelu")], node.name)
    L.fail(node, f"no ONNX translation for activation {kind!r}")


def t_lm_head(L: Lowering, node: Node, x: list[str]) -> str:
    b = L.b
    v, h = node.attrs["vocab_size"], L.graph.params[node.params["weight"]].shape[1]
    flat = b.op("Reshape", [x[0], b.const([-1, h])], "lm_head.rows")
    y = b.op("Gemm", [flat, L.param(node, "weight")], "lm_head.gemm", transB=1)
    if L.elem == FLOAT:
        return b.op("Reshape", [y, L.shape_tail(v)], outputs=["logits"])  # (B, S, V)
    y = b.op("Reshape", [y, L.shape_tail(v)], "lm_head")
    return b.op("Cast", [y], outputs=["logits"], to=FLOAT)  # (B, S, V) float32


TRANSLATIONS: dict[str, Callable] = {
    "embedding": t_embedding,
    "norm": t_norm,
    "linear": t_linear,
    "rope": t_rope,
    "attention": t_attention,
    "activation": t_activation,
    "residual": t_residual,
    "residual_norm": t_residual_norm,
    "lm_head": t_lm_head,
}


def translate(L: Lowering) -> None:
    """Write the whole graph: the prologue, then every IR node in order."""
    for node in L.graph.nodes:  # refuse before writing anything
        if node.op not in TRANSLATIONS:
            L.fail(node, f"there is no ONNX translation for IR op {node.op!r} (translated ops: "
                         f"{', '.join(sorted(TRANSLATIONS))})")
    prologue(L)
    for node in L.graph.nodes:
        inputs = [L.env[name] for name in node.inputs]
        result = TRANSLATIONS[node.op](L, node, inputs)
        results = (result,) if isinstance(result, str) else tuple(result)
        if len(results) != len(node.outputs):
            raise AssertionError(f"translation of {node.op} gave {len(results)} outputs for {node.outputs}")
        for name, value in zip(node.outputs, results):
            L.env[name] = value
    L.b.output("logits", FLOAT, ["batch", "sequence", L.cfg.vocab_size])
