"""Independent reference implementations of ChatGLM-6B (first generation) and GLM-130B, written
from the ORIGINAL model code, in the originals' own layout. Torch only: nothing here imports glmrt.

Sources followed (read through the code index; quoted names are the originals'):

ChatGLM-6B -- THUDM's model-hub `modeling_chatglm.py` / `tokenization_chatglm.py` (final revision,
ids 130000+):
  * `RotaryEmbedding(dim, base=10000, precision=torch.half)`: `inv_freq = 1/(base**(arange(0,dim,2).float()/dim))`
    then `inv_freq = inv_freq.half()`; `t = arange(seq_len, dtype=inv_freq.dtype)`;
    `freqs = einsum('i,j->ij', t, inv_freq)`; `emb = cat(freqs, freqs)`; `cos/sin = emb.cos()/sin()`.
    `inv_freq` is a registered buffer, so `model.half()` / `.float()` / `.bfloat16()` (Module._apply)
    convert it with the weights, and the table is built at run time in that dtype (fp16 for the
    released `.half()` model, fp32 products of the fp16-rounded frequencies after `.float()`, all
    bf16 after `.bfloat16()`); the cos/sin caches are plain attributes, rebuilt from the buffer.
    `precision` is always torch.half here, so its bf16 branch (cos/sin of fp32 angles) never runs.
    See `rope_precision` below.
  * `apply_rotary_pos_emb_index`: `F.embedding(position_id, cos.squeeze(1)).unsqueeze(2)`,
    `q*cos + rotate_half(q)*sin` with `rotate_half = cat(-x2, x1)` (NeoX pairing).
  * `SelfAttention.forward`: `mixed_raw_layer.view(sq, b, np, 3*hn)`, split in three (per-head
    interleaved q|k|v rows), 2-D RoPE: `q1, q2 = q.chunk(2)`; rotary dim = hn/2; q1/k1 rotated by
    `position_ids[:, 0]`, q2/k2 by `position_ids[:, 1]` (block positions).
  * `attention_fn`: `q / (sqrt(hn) * (layer_id+1))`, `baddbmm` scores, `masked_fill_(mask, -10000.0)`
    unless the mask is all False, `scores.float() * (layer_id+1)`, softmax, cast back.
  * `GLMBlock(..., num_layers=28)`: `ChatGLMModel.get_layer` never passes `num_layers`, so
    `alpha = (2 * 28) ** 0.5` whatever config.num_layers says; residual is
    `attention_input * alpha + attention_output` (the NORMALIZED input).
  * `GLU`: `dense_4h_to_h(gelu_impl(dense_h_to_4h(x)))`, `gelu_impl` = OpenAI tanh formula.
  * `get_masks`: tril, then every column before `<sop>` (bos) visible; True = masked.
  * `get_position_ids` (2-D): arange, `[context_length:] = mask_position`, block ids 0 over the
    context, then 1, 2, ...; `_update_model_kwargs_for_generation`: new mask row = copy of the last
    row (+ own column unmasked), new position = last position, block + 1.
  * tokenizer `_pad` (left padding): per unpadded prompt: mask/positions as above (the tokenizer
    prefers [MASK] over [gMASK] when looking up the mask position), then the mask is padded with
    True (masked) on the padded rows/columns and the position ids with 0.

GLM-130B -- SwissArmyTransformer `SwissArmyTransformer/model/official/glm130B_model.py` (the package
the GLM-130B repo imports) and the GLM-130B repo's `generate.py`:
  * RotaryEmbedding from `SwissArmyTransformer.model.position_embedding` (0.2.x, the version
    GLM-130B uses: `inv_freq = inv_freq.half()` whatever `--fp16` says, a registered buffer, the
    table built in the buffer's dtype; the mixin passes `precision=torch.half if fp16 else
    torch.float`, so the bf16 branch never runs): 1-D, over the whole head. `GLM130B(args).half()`
    in initialize.py makes it fp16 in the release; a `.float()` model builds it in fp32.
  * attention as above (mask skip rule: `attention_mask.shape[-2] == 1 and (mask > 0).all()`), the
    `SelfAttentionWithFP32SoftmaxMixin` non-fused path.
  * `DeepNormWithGLUMixin.layer_forward`: alpha = (2 * num_layers) ** 0.5.
  * `GEGLU`: `x1, x2 = x.chunk(2); x1 * F.gelu(x2)` (erf gelu), per tensor-parallel rank.
  * `FinalForwardMixin`: logits = `F.linear(h, word_embeddings.weight)` (tied).
  * Tensor parallelism is SIMULATED rank by rank from the SAT rank files (no merging):
    VocabParallelEmbedding (out-of-range rows zeroed, all-reduce), ColumnParallelLinear
    (gather_output=False), RowParallelLinear (partial products all-reduced, then + bias),
    GEGLU on each rank's local [x1_shard; x2_shard], logits gathered over vocab shards.
  * `generate.py:get_masks_and_position_ids(seq, mask_position, max_gen_length, gmask)`:
    `context_length = seq.shape[1]` (prompt INCLUDING <sop>), tril, columns `[:context_length-1]`
    visible to all; positions arange, and `[context_length-1:] = mask_position` unless gmask.
  * `fill_blanks`: `generation_mask = "[MASK]" if "[MASK]" in raw_text else "[gMASK]"` -- a plain
    [MASK] takes precedence over [gMASK].

Precision: the originals run fp16 weights; these references compute in whatever dtype the weights
are given in, as the original converted to that dtype does. RoPE tables: the inv_freq buffer follows
the weights (`rope_precision="model"`, the default: the model converted with .half() / .bfloat16()
/ .float(), tables built in that dtype from the fp16-rounded frequencies); `rope_precision=<a
dtype>` converts it to that dtype whatever the weights are; `rope_precision="half"` keeps it fp16
(a float32 module that was never converted, e.g. built under an fp32 default dtype without
`.float()`), `"float"` fp32 (test_original_code_half_precision.py). The original's non-fused
softmax path casts probabilities back with `.half()` (GLM-130B) or to the score dtype
(ChatGLM-6B); here they are cast back to the model dtype. ChatGLM2Reference below is THUDM's later
code (ChatGLM2/3, GLM-4-9B).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ============================================================================ shared pieces
class RotaryEmbedding:
    """THUDM's / SAT's RotaryEmbedding (the `inv_freq = inv_freq.half()` version).

    rope_precision="model": the inv_freq buffer converted to the dtype of the tensor the table is
    built for (what `model.float()` / `.half()` / `.bfloat16()` do to the registered buffer), so
    positions, their product with the fp16-rounded frequencies and cos/sin are in the model dtype.
    A torch dtype: the buffer converted to that dtype. "half": the buffer left in fp16 (an fp16
    table whatever the weights are); "float": converted to fp32."""

    def __init__(self, dim: int, base: float = 10000, rope_precision: str | torch.dtype = "model"):
        named = {"model": None, "half": torch.float16, "float": torch.float32}
        if not isinstance(rope_precision, torch.dtype) and rope_precision not in named:
            raise ValueError(rope_precision)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.inv_freq = inv_freq.half()
        # The dtype Module._apply gives the registered buffer (None: the one the module, and so the
        # tensor the table is built for, was converted to). ChatGLM-6B passes precision=torch.half
        # and GLM-130B torch.half / torch.float, so the original forward's `precision ==
        # torch.bfloat16` branch (cos/sin of fp32 angles) is never taken.
        self.buffer_dtype = rope_precision if isinstance(rope_precision, torch.dtype) else named[rope_precision]

    def __call__(self, x: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        inv_freq = self.inv_freq.to(self.buffer_dtype or x.dtype)
        t = torch.arange(seq_len, device=x.device, dtype=inv_freq.dtype)
        freqs = torch.einsum("i,j->ij", t, inv_freq.to(x.device))
        emb = torch.cat((freqs, freqs), dim=-1).to(x.device)
        cos_cached = emb.cos()[:, None, :]  # [sx, 1, hn]
        sin_cached = emb.sin()[:, None, :]
        return cos_cached[:seq_len, ...], sin_cached[:seq_len, ...]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=x1.ndim - 1)


def apply_rotary_pos_emb_index(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_id: Tensor):
    # position_id: [sq, b], q, k: [sq, b, np, hn], cos: [sq, 1, hn] -> [sq, b, 1, hn]
    cos, sin = F.embedding(position_id, cos.squeeze(1)).unsqueeze(2), \
        F.embedding(position_id, sin.squeeze(1)).unsqueeze(2)
    q, k = (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
    return q, k


def split_tensor_along_last_dim(tensor: Tensor, num_partitions: int):
    last_dim = tensor.dim() - 1
    last_dim_size = tensor.size()[last_dim] // num_partitions
    return torch.split(tensor, last_dim_size, dim=last_dim)


def gelu_impl(x: Tensor) -> Tensor:
    """OpenAI's gelu implementation (ChatGLM-6B's `gelu_impl`). The original is `@torch.jit.script`
    and its module turns the TorchScript fusers on (`_jit_override_can_fuse_on_cpu/gpu(True)`, the
    legacy executor): the fused kernel computes a half-precision input in fp32 and rounds once, as
    here (in fp32 the same formula)."""
    xf = x.float()
    return (0.5 * xf * (1.0 + torch.tanh(0.7978845608028654 * xf * (1.0 + 0.044715 * xf * xf)))).to(x.dtype)


def layer_scaled_attention(query_layer: Tensor, key_layer: Tensor, value_layer: Tensor, attention_mask: Tensor,
                           layer_id: int, skip_rule: str, fill: float = -10000.0) -> Tensor:
    """The originals' `attention_fn` (non-fused path), [sq, b, np, hn] in, [sq, b, np*hn] out.

    skip_rule "chatglm": `if not (attention_mask == 0).all(): masked_fill_`
    skip_rule "sat":     `if not (attention_mask.shape[-2] == 1 and (attention_mask > 0).all()): masked_fill_`"""
    dtype = query_layer.dtype
    hidden_size = key_layer.shape[-1]
    query_key_layer_scaling_coeff = float(layer_id + 1)
    query_layer = query_layer / (math.sqrt(hidden_size) * query_key_layer_scaling_coeff)

    # [b, np, sq, sk]
    output_size = (query_layer.size(1), query_layer.size(2), query_layer.size(0), key_layer.size(0))
    query_layer = query_layer.reshape(output_size[2], output_size[0] * output_size[1], -1)
    key_layer = key_layer.reshape(output_size[3], output_size[0] * output_size[1], -1)
    matmul_result = torch.empty(output_size[0] * output_size[1], output_size[2], output_size[3],
                                dtype=query_layer.dtype, device=query_layer.device)
    matmul_result = torch.baddbmm(matmul_result, query_layer.transpose(0, 1),
                                  key_layer.transpose(0, 1).transpose(1, 2), beta=0.0, alpha=1.0)
    attention_scores = matmul_result.view(*output_size)

    if skip_rule == "chatglm":
        skip = bool((attention_mask == 0).all())
    elif skip_rule == "sat":
        skip = attention_mask.shape[-2] == 1 and bool((attention_mask > 0).all())
    else:
        raise ValueError(skip_rule)
    if not skip:
        attention_scores = attention_scores.masked_fill(attention_mask, fill)  # the originals: -10000.0
    attention_scores = attention_scores.float()
    attention_scores = attention_scores * query_key_layer_scaling_coeff
    attention_probs = F.softmax(attention_scores, dim=-1)
    attention_probs = attention_probs.to(dtype)

    # [b, np, sq, hn]
    output_size = (value_layer.size(1), value_layer.size(2), query_layer.size(0), value_layer.size(3))
    value_layer = value_layer.reshape(value_layer.size(0), output_size[0] * output_size[1], -1)
    attention_probs = attention_probs.view(output_size[0] * output_size[1], output_size[2], -1)
    context_layer = torch.bmm(attention_probs, value_layer.transpose(0, 1))
    context_layer = context_layer.view(*output_size)
    context_layer = context_layer.permute(2, 0, 1, 3).contiguous()  # [sq, b, np, hn]
    new_shape = context_layer.size()[:-2] + (output_size[1] * output_size[3],)
    return context_layer.view(*new_shape)


def _layer_norm(x: Tensor, sd: dict, prefix: str, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


# ============================================================================ ChatGLM-6B
class ChatGLM6BReference:
    """ChatGLMForConditionalGeneration (final revision) as plain functions over a state dict with the
    release's tensor names. `config` holds the config.json keys."""

    RESIDUAL_NUM_LAYERS = 28  # GLMBlock's default, never overridden by ChatGLMModel.get_layer

    def __init__(self, state_dict: dict[str, Tensor], config: dict, rope_precision: str | torch.dtype = "model"):
        self.sd = state_dict
        self.cfg = config
        self.hidden_size = int(config["hidden_size"])
        self.num_heads = int(config["num_attention_heads"])
        self.hn = self.hidden_size // self.num_heads
        self.num_layers = int(config["num_layers"])
        self.eps = float(config.get("layernorm_epsilon", 1e-5))
        self.bos = int(config["bos_token_id"])
        self.mask_id = int(config["mask_token_id"])
        self.gmask_id = int(config["gmask_token_id"])
        self.pad_id = int(config["pad_token_id"])
        self.rotary_emb = RotaryEmbedding(self.hidden_size // (self.num_heads * 2), base=10000,
                                          rope_precision=rope_precision)

    # ------------------------------------------------------------------ masks / positions
    def get_masks(self, input_ids: Tensor) -> Tensor:
        batch_size, seq_length = input_ids.shape
        context_lengths = [seq.tolist().index(self.bos) for seq in input_ids]
        attention_mask = torch.ones((batch_size, seq_length, seq_length))
        attention_mask.tril_()
        for i, context_length in enumerate(context_lengths):
            attention_mask[i, :, :context_length] = 1
        attention_mask.unsqueeze_(1)
        return (attention_mask < 0.5).bool()

    def get_position_ids(self, input_ids: Tensor, mask_positions: Sequence[int]) -> Tensor:
        batch_size, seq_length = input_ids.shape
        context_lengths = [seq.tolist().index(self.bos) for seq in input_ids]
        position_ids = torch.arange(seq_length, dtype=torch.long).unsqueeze(0).repeat(batch_size, 1)
        for i, context_length in enumerate(context_lengths):
            position_ids[i, context_length:] = mask_positions[i]
        block_position_ids = torch.stack([torch.cat((
            torch.zeros(context_length, dtype=torch.long),
            torch.arange(seq_length - context_length, dtype=torch.long) + 1,
        )) for context_length in context_lengths], dim=0)
        return torch.stack((position_ids, block_position_ids), dim=1)

    def model_inputs(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """What ChatGLMModel.forward builds when no mask / position ids are given (unpadded batch)."""
        mask_positions = []
        for seq in input_ids.tolist():
            mask_token = self.gmask_id if self.gmask_id in seq else self.mask_id
            mask_positions.append(seq.index(mask_token))
        return self.get_masks(input_ids), self.get_position_ids(input_ids, mask_positions)

    def tokenizer_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor]:
        """tokenization_chatglm.ChatGLMTokenizer._pad over a batch, left padding to the longest.
        Returns (input_ids [B, T], attention_mask [B, 1, T, T] bool True=masked, position_ids [B, 2, T])."""
        max_length = max(len(p) for p in prompts)
        ids_out, masks, positions = [], [], []
        for required_input in prompts:
            required_input = list(required_input)
            seq_length = len(required_input)
            context_length = required_input.index(self.bos) if self.bos in required_input else seq_length
            attention_mask = torch.ones((1, seq_length, seq_length))
            attention_mask = torch.tril(attention_mask)
            attention_mask[:, :, :context_length] = 1
            attention_mask = attention_mask < 0.5
            position_ids = torch.arange(seq_length, dtype=torch.long)
            mask_token = self.mask_id if self.mask_id in required_input else self.gmask_id
            if mask_token in required_input:
                position_ids[context_length:] = required_input.index(mask_token)
            block_position_ids = torch.cat([torch.zeros(context_length, dtype=torch.long),
                                            torch.arange(1, seq_length - context_length + 1, dtype=torch.long)])
            position_ids = torch.stack([position_ids, block_position_ids], dim=0)
            difference = max_length - seq_length
            if difference:
                padded = torch.ones((1, max_length, max_length), dtype=torch.bool)  # pads: masked
                padded[:, difference:, difference:] = attention_mask
                attention_mask = padded
                position_ids = F.pad(position_ids, (difference, 0), value=0)
                required_input = [self.pad_id] * difference + required_input
            ids_out.append(required_input)
            masks.append(attention_mask)
            positions.append(position_ids)
        return torch.tensor(ids_out, dtype=torch.long), torch.stack(masks, 0), torch.stack(positions, 0)

    @staticmethod
    def update_for_generation(attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """ChatGLMForConditionalGeneration._update_model_kwargs_for_generation."""
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((*attention_mask.shape[:3], 1))], dim=3)
        new_attention_mask = attention_mask[:, :, -1:].clone()
        new_attention_mask[..., -1] = False
        attention_mask = torch.cat([attention_mask, new_attention_mask], dim=2)
        new_position_id = position_ids[..., -1:].clone()
        new_position_id[:, 1, :] += 1
        position_ids = torch.cat([position_ids, new_position_id], dim=-1)
        return attention_mask, position_ids

    # ------------------------------------------------------------------ forward
    def _self_attention(self, hidden_states: Tensor, position_ids: Tensor, attention_mask: Tensor,
                        layer_id: int) -> Tensor:
        p = f"transformer.layers.{layer_id}.attention"
        mixed_raw_layer = F.linear(hidden_states, self.sd[p + ".query_key_value.weight"],
                                   self.sd[p + ".query_key_value.bias"])
        new_tensor_shape = mixed_raw_layer.size()[:-1] + (self.num_heads, 3 * self.hn)
        mixed_raw_layer = mixed_raw_layer.view(*new_tensor_shape)
        query_layer, key_layer, value_layer = split_tensor_along_last_dim(mixed_raw_layer, 3)

        q1, q2 = query_layer.chunk(2, dim=(query_layer.ndim - 1))
        k1, k2 = key_layer.chunk(2, dim=(key_layer.ndim - 1))
        cos, sin = self.rotary_emb(q1, seq_len=int(position_ids.max()) + 1)
        pos, block_pos = position_ids[:, 0, :].transpose(0, 1).contiguous(), \
            position_ids[:, 1, :].transpose(0, 1).contiguous()
        q1, k1 = apply_rotary_pos_emb_index(q1, k1, cos, sin, pos)
        q2, k2 = apply_rotary_pos_emb_index(q2, k2, cos, sin, block_pos)
        query_layer = torch.concat([q1, q2], dim=(q1.ndim - 1))
        key_layer = torch.concat([k1, k2], dim=(k1.ndim - 1))

        context_layer = layer_scaled_attention(query_layer, key_layer, value_layer, attention_mask, layer_id,
                                               skip_rule="chatglm")
        return F.linear(context_layer, self.sd[p + ".dense.weight"], self.sd[p + ".dense.bias"])

    def _glm_block(self, hidden_states: Tensor, position_ids: Tensor, attention_mask: Tensor, layer_id: int):
        p = f"transformer.layers.{layer_id}"
        attention_input = _layer_norm(hidden_states, self.sd, p + ".input_layernorm", self.eps)
        attention_output = self._self_attention(attention_input, position_ids, attention_mask, layer_id)
        alpha = (2 * self.RESIDUAL_NUM_LAYERS) ** 0.5
        hidden_states = attention_input * alpha + attention_output
        mlp_input = _layer_norm(hidden_states, self.sd, p + ".post_attention_layernorm", self.eps)
        inter = F.linear(mlp_input, self.sd[p + ".mlp.dense_h_to_4h.weight"], self.sd[p + ".mlp.dense_h_to_4h.bias"])
        inter = gelu_impl(inter)
        mlp_output = F.linear(inter, self.sd[p + ".mlp.dense_4h_to_h.weight"], self.sd[p + ".mlp.dense_4h_to_h.bias"])
        return mlp_input * alpha + mlp_output

    @torch.no_grad()
    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] (ChatGLMForConditionalGeneration.forward, no cache)."""
        if attention_mask is None or position_ids is None:
            m, p = self.model_inputs(input_ids)
            attention_mask = m if attention_mask is None else attention_mask
            position_ids = p if position_ids is None else position_ids
        inputs_embeds = F.embedding(input_ids, self.sd["transformer.word_embeddings.weight"])
        hidden_states = inputs_embeds.transpose(0, 1)  # [seq, batch, hidden]
        for i in range(self.num_layers):
            hidden_states = self._glm_block(hidden_states, position_ids, attention_mask, i)
        hidden_states = _layer_norm(hidden_states, self.sd, "transformer.final_layernorm", self.eps)
        lm_logits = F.linear(hidden_states, self.sd["lm_head.weight"]).permute(1, 0, 2).contiguous()
        return lm_logits

    @torch.no_grad()
    def greedy_generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        eos_token_id: int | None = None) -> tuple[Tensor, Tensor, list[float]]:
        """model.generate(**tokenizer(prompts, padding=True), do_sample=False) with a full
        recompute each step. Returns (padded prompt + new ids, padded prompt mask [B, T] of 0/1,
        per-step smallest top-1/top-2 logit margin over the still-running rows)."""
        input_ids, attention_mask, position_ids = self.tokenizer_pad(prompts)
        T = input_ids.shape[1]
        lengths = torch.tensor([len(p) for p in prompts])
        pad_mask = (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long()
        eos = self.cfg["eos_token_id"] if eos_token_id is None else eos_token_id
        finished = torch.zeros(len(prompts), dtype=torch.bool)
        margins = []
        for step in range(max_new_tokens):
            logits = self.forward(input_ids, position_ids, attention_mask)[:, -1, :].float()
            top2 = logits.topk(2, dim=-1).values
            running = ~finished
            margins.append(float((top2[:, 0] - top2[:, 1])[running].min()))
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
            finished = finished | (nxt == eos)
            input_ids = torch.cat([input_ids, nxt[:, None]], dim=-1)
            if bool(finished.all()):
                break
            attention_mask, position_ids = self.update_for_generation(attention_mask, position_ids)
        return input_ids, pad_mask, margins


# ============================================================================ GLM-130B
class GLM130BReference:
    """SAT's GLM130B forward, simulated over tensor-parallel ranks. `ranks` is the list of the
    `module` state dicts of mp_rank_00 .. mp_rank_{P-1}, exactly as saved (no merging)."""

    def __init__(self, ranks: Sequence[dict[str, Tensor]], num_layers: int, hidden_size: int,
                 num_attention_heads: int, layernorm_epsilon: float = 1e-5,
                 rope_precision: str | torch.dtype = "model", bias_inside_row_parallel: bool = False):
        """bias_inside_row_parallel: a WRONG variant, for the tests that tell it apart: one rank's
        row-parallel bias inside F.linear (one rounding) instead of after the matmul."""
        self.ranks = list(ranks)
        self.P = len(self.ranks)
        self.bias_inside = bias_inside_row_parallel
        assert not bias_inside_row_parallel or self.P == 1
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.hn = hidden_size // num_attention_heads
        assert num_attention_heads % self.P == 0
        self.np = num_attention_heads // self.P  # num_attention_heads_per_partition
        self.eps = layernorm_epsilon
        self.rotary_emb = RotaryEmbedding(self.hn, base=10000, rope_precision=rope_precision)

    # ------------------------------------------------------------------ mpu layers
    def _vocab_parallel_embedding(self, input_: Tensor) -> Tensor:
        out = None
        start = 0
        for sd in self.ranks:
            weight = sd["transformer.word_embeddings.weight"]
            end = start + weight.shape[0]
            input_mask = (input_ < start) | (input_ >= end)
            masked_input = input_.clone() - start
            masked_input[input_mask] = 0
            output_parallel = F.embedding(masked_input, weight)
            output_parallel[input_mask, :] = 0.0
            out = output_parallel if out is None else out + output_parallel  # all-reduce
            start = end
        return out

    def _row_parallel(self, inputs: list[Tensor], name: str) -> Tensor:
        """RowParallelLinear(input_is_parallel=True): sum of per-rank partial products, then + bias."""
        if self.bias_inside:
            return F.linear(inputs[0], self.ranks[0][name + ".weight"], self.ranks[0][name + ".bias"])
        out = None
        for sd, x in zip(self.ranks, inputs):
            part = F.linear(x, sd[name + ".weight"])
            out = part if out is None else out + part
        return out + self.ranks[0][name + ".bias"]

    # ------------------------------------------------------------------ layer
    def _attention_rank(self, sd: dict, hidden_states: Tensor, mask: Tensor, position_ids: Tensor,
                        layer_id: int) -> Tensor:
        p = f"transformer.layers.{layer_id}.attention.query_key_value"
        mixed_raw_layer = F.linear(hidden_states, sd[p + ".weight"], sd[p + ".bias"])  # ColumnParallel
        new_tensor_shape = mixed_raw_layer.size()[:-1] + (self.np, 3 * self.hn)
        mixed_raw_layer = mixed_raw_layer.view(*new_tensor_shape)
        query_layer, key_layer, value_layer = split_tensor_along_last_dim(mixed_raw_layer, 3)
        pos = position_ids.transpose(0, 1)
        cos, sin = self.rotary_emb(value_layer, seq_len=int(pos.max()) + 1)
        query_layer, key_layer = apply_rotary_pos_emb_index(query_layer, key_layer, cos, sin, pos)
        return layer_scaled_attention(query_layer, key_layer, value_layer, mask, layer_id, skip_rule="sat")

    def _layer(self, hidden_states: Tensor, mask: Tensor, position_ids: Tensor, layer_id: int) -> Tensor:
        p = f"transformer.layers.{layer_id}"
        rep = self.ranks[0]  # layernorms are replicated
        attention_input = _layer_norm(hidden_states, rep, p + ".input_layernorm", self.eps)
        contexts = [self._attention_rank(sd, attention_input, mask, position_ids, layer_id) for sd in self.ranks]
        attention_output = self._row_parallel(contexts, p + ".attention.dense")
        alpha = (2 * self.num_layers) ** 0.5
        hidden_states = attention_input * alpha + attention_output
        mlp_input = _layer_norm(hidden_states, rep, p + ".post_attention_layernorm", self.eps)
        inters = []
        for sd in self.ranks:
            x = F.linear(mlp_input, sd[p + ".mlp.dense_h_to_4h.weight"], sd[p + ".mlp.dense_h_to_4h.bias"])
            x1, x2 = x.chunk(2, dim=(x.ndim - 1))  # GEGLU on the rank's local output
            inters.append(x1 * F.gelu(x2))
        mlp_output = self._row_parallel(inters, p + ".mlp.dense_4h_to_h")
        return mlp_input * alpha + mlp_output

    @torch.no_grad()
    def forward(self, tokens: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """tokens [B, T], position_ids [B, T], attention_mask [B or 1, 1, T, T] bool (True = masked)
        -> logits [B, T, V]."""
        hidden_states = self._vocab_parallel_embedding(tokens).transpose(0, 1)  # WordEmbedding mixin
        for i in range(self.num_layers):
            hidden_states = self._layer(hidden_states, attention_mask, position_ids, i)
        rep = self.ranks[0]
        logits = _layer_norm(hidden_states, rep, "transformer.final_layernorm", self.eps)
        parts = [F.linear(logits, sd["transformer.word_embeddings.weight"]).transpose(0, 1).contiguous()
                 for sd in self.ranks]
        return torch.cat(parts, dim=-1)  # gather_from_model_parallel_region

    # ------------------------------------------------------------------ generate.py
    @staticmethod
    def get_masks_and_position_ids(seq: Tensor, mask_position: int, max_gen_length: int, gmask: bool = False):
        context_length = seq.shape[1]
        tokens = F.pad(seq, (0, max_gen_length), mode="constant", value=-1)
        attention_mask = torch.ones((1, tokens.shape[-1], tokens.shape[-1]))
        attention_mask.tril_()
        attention_mask[..., : context_length - 1] = 1
        attention_mask.unsqueeze_(1)
        attention_mask = (attention_mask < 0.5).bool()
        position_ids = torch.arange(tokens.shape[-1], dtype=torch.long)
        if not gmask:
            position_ids[context_length - 1:] = mask_position
        position_ids = position_ids.unsqueeze(0)
        return tokens, attention_mask, position_ids

    @staticmethod
    def blank_to_fill(seq: Sequence[int], mask_id: int, gmask_id: int) -> tuple[int, bool]:
        """fill_blanks: [MASK] takes precedence over [gMASK]; returns (mask_position, use_gmask)."""
        seq = list(seq)
        use_gmask = mask_id not in seq
        mask_token = gmask_id if use_gmask else mask_id
        return seq.index(mask_token), use_gmask

    def logits_for_prompt(self, prompt_with_sop: Sequence[int], mask_id: int, gmask_id: int) -> Tensor:
        """Logits [1, T, V] of a prompt `... [g]MASK ... <sop>` with generate.py's mask/positions."""
        seq = list(prompt_with_sop)
        mask_position, use_gmask = self.blank_to_fill(seq[:-1], mask_id, gmask_id)
        tokens, mask, pos = self.get_masks_and_position_ids(torch.tensor([seq]), mask_position, 0, gmask=use_gmask)
        return self.forward(tokens, pos, mask)

    @torch.no_grad()
    def greedy_generate(self, prompt_with_sop: Sequence[int], max_new_tokens: int, mask_id: int, gmask_id: int,
                        end_tokens: Sequence[int]) -> tuple[list[int], list[float]]:
        """fill_blanks + batch_filling_sequence with a greedy strategy, recomputing the whole prefix
        each step (no mems). Returns (prompt + new ids, per-step top-1/top-2 logit margins)."""
        seq = list(prompt_with_sop)
        mask_position, use_gmask = self.blank_to_fill(seq[:-1], mask_id, gmask_id)
        input_seq = torch.tensor([seq])
        tokens, attention_mask, position_ids = self.get_masks_and_position_ids(
            input_seq, mask_position, max_new_tokens, gmask=use_gmask)
        counter = input_seq.shape[1] - 1
        margins = []
        for _ in range(max_new_tokens):
            logits = self.forward(tokens[:, : counter + 1], position_ids[..., : counter + 1],
                                  attention_mask[..., : counter + 1, : counter + 1])[:, -1].float()
            top2 = logits.topk(2, dim=-1).values[0]
            margins.append(float(top2[0] - top2[1]))
            nxt = int(logits.argmax(dim=-1))
            counter += 1
            tokens[0, counter] = nxt
            if nxt in end_tokens:
                break
        out = tokens[0, : counter + 1].tolist()
        return out, margins


# ============================================================================ ChatGLM2/3, GLM-4-9B (THUDM code)
def sdpa_flash(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """What `F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=...)` computes with its
    flash kernels (torch's CPU kernel, and flash attention on CUDA), written out: fp32 scores
    q . k / sqrt(d), masked to -inf; exp(score - row max) in fp32; those exps ROUNDED to the model
    dtype for the product with V (fp32 accumulation); divided by the fp32 sum of the unrounded exps;
    the output rounded once. With every key in one block (as here) this is the kernel's arithmetic
    exactly, except that torch's vectorised CPU loop takes exp from an approximation
    (`Vectorized::exp_u20`) for rows of 8+ keys: tests/models/test_original_code_half_precision.py
    checks this function against the real call bit for bit on rows of fewer keys, where the kernel
    uses std::exp, and within an ulp of the row's largest output beyond."""
    dtype = q.dtype
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return (torch.matmul(e.to(dtype).float(), v.float()) / e.sum(dim=-1, keepdim=True)).to(dtype)


class ChatGLM2Reference:
    """THUDM's modeling_chatglm.py of ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B (`model_type: "chatglm"`),
    as plain functions over a state dict with the release's tensor names, in the weights' dtype.

    Followed (model-hub code, torch >= 2 path):
      * `RMSNorm.forward`: `variance = h.to(float32).pow(2).mean(-1, keepdim=True)`;
        `h = h * torch.rsqrt(variance + eps)` (promotes to fp32); `(self.weight * h).to(input_dtype)`:
        the weight multiply in fp32, one rounding (`weight_multiply_first=False` is that order;
        True = transformers' glm: round the normalized value, then multiply in the model dtype).
      * `RotaryEmbedding(rotary_dim // 2, rope_ratio=...).forward_impl(seq_len, n_elem, dtype)`:
        `base = 10000 * rope_ratio`, `theta = 1 / base ** (arange(0, n_elem, 2, float) / n_elem)`,
        `idx_theta = outer(arange(seq_len, float), theta).float()`, `cache = stack([cos, sin], -1)`
        then `.half()` / `.bfloat16()` for a half model (dtype = the inv_freq buffer's = the model's):
        fp32 tables rounded once to the model dtype.
      * `apply_rotary_pos_emb`: interleaved pairs on the first rot_dim = 2 * cache.shape[-2] dims,
        `x0*c - x1*s, x1*c + x0*s` in the model dtype, the rest passed through.
      * `SelfAttention`: `query_key_value` rows [q (np*hn) | k (ng*hn) | v (ng*hn)]; keys/values
        expanded so query head h reads group h // (np / ng).
      * `CoreAttention` (torch >= 2): `scaled_dot_product_attention(q, k, v, is_causal=True)` when no
        mask is needed, else with `~full_attention_mask`; in the model dtype (written out as the
        flash kernels compute it: `sdpa_flash`).
      * `GLMBlock`: pre-norm, residual adds in the model dtype; `MLP`: swiglu
        `silu(x[0]) * x[1]` of `chunk(dense_h_to_4h(x), 2)`; final RMSNorm; `output_layer`.
      * `get_masks` with a padding mask: causal, padded keys masked (padded query rows see
        everything: their outputs are not compared)."""

    weight_multiply_first = False

    def __init__(self, state_dict: dict[str, Tensor], config: dict):
        self.sd = state_dict
        self.num_layers = int(config["num_layers"])
        self.np = int(config["num_attention_heads"])
        self.ng = int(config["multi_query_group_num"]) if config.get("multi_query_attention", True) else self.np
        self.hn = int(config["kv_channels"])
        self.eps = float(config["layernorm_epsilon"])
        self.base = 10000.0 * float(config.get("rope_ratio", 1.0))
        self.rotary_dim = self.hn // 2
        self.dtype = state_dict["transformer.embedding.word_embeddings.weight"].dtype

    def _rms_norm(self, h: Tensor, name: str) -> Tensor:
        weight = self.sd[name + ".weight"]
        input_dtype = h.dtype
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        if self.weight_multiply_first:  # transformers' order (a variant, to show the tests can tell)
            return weight * (h.to(torch.float32) * torch.rsqrt(variance + self.eps)).to(input_dtype)
        h = h * torch.rsqrt(variance + self.eps)
        return (weight * h).to(input_dtype)

    def _rope_cache(self, seq_len: int) -> Tensor:
        n_elem = self.rotary_dim
        theta = 1.0 / (self.base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
        seq_idx = torch.arange(seq_len, dtype=torch.float)
        idx_theta = torch.outer(seq_idx, theta).float()
        cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
        if self.dtype in (torch.float16, torch.bfloat16):
            cache = cache.bfloat16() if self.dtype == torch.bfloat16 else cache.half()
        return cache  # [seq_len, n_elem / 2, 2]

    @staticmethod
    def _apply_rotary_pos_emb(x: Tensor, rope_cache: Tensor) -> Tensor:
        # x: [sq, b, np, hn]; rope_cache: [sq, b, rot_dim / 2, 2]
        sq, np_ = x.size(0), x.size(2)
        rot_dim = rope_cache.shape[-2] * 2
        x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        xshaped = x.reshape(sq, -1, np_, rot_dim // 2, 2)
        rope_cache = rope_cache.view(sq, -1, 1, xshaped.size(3), 2)
        x_out2 = torch.stack([xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
                              xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1]], -1)
        return torch.cat((x_out2.flatten(3), x_pass), dim=-1)

    def _attention(self, h: Tensor, rope: Tensor, mask: Tensor | None, i: int) -> Tensor:
        p = f"transformer.encoder.layers.{i}.self_attention"
        mixed = F.linear(h, self.sd[p + ".query_key_value.weight"], self.sd.get(p + ".query_key_value.bias"))
        q, k, v = mixed.split([self.np * self.hn, self.ng * self.hn, self.ng * self.hn], dim=-1)
        q = q.view(*q.shape[:-1], self.np, self.hn)
        k = k.view(*k.shape[:-1], self.ng, self.hn)
        v = v.view(*v.shape[:-1], self.ng, self.hn)
        q, k = self._apply_rotary_pos_emb(q, rope), self._apply_rotary_pos_emb(k, rope)
        group = self.np // self.ng
        k = k.unsqueeze(-2).expand(-1, -1, -1, group, -1).reshape(*k.shape[:2], self.np, self.hn)
        v = v.unsqueeze(-2).expand(-1, -1, -1, group, -1).reshape(*v.shape[:2], self.np, self.hn)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, np, sq, hn]
        if mask is None:
            ctx = sdpa_flash(q, k, v, is_causal=True)
        else:
            ctx = sdpa_flash(q, k, v, ~mask)
        ctx = ctx.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], self.np * self.hn)  # [sq, b, h]
        return F.linear(ctx, self.sd[p + ".dense.weight"])

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids [B, T]; attention_mask [B, T] of 0/1 (left padding) or None -> logits [B, T, V].
        Position ids as the THUDM tokenizer's _pad gives them: 0, 1, ... from each row's first real
        token (0 on the padding)."""
        B, T = input_ids.shape
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(T)[None].expand(B, T)
            mask = None
        else:
            pad = attention_mask.long()
            positions = (pad.cumsum(-1) - 1).clamp(min=0) * pad
            full = torch.ones(B, T, T).tril_() * pad[:, None, :]
            full -= pad[:, :, None] - 1  # get_masks: padded query rows see everything
            mask = (full < 0.5)[:, None]  # [B, 1, T, T], True = masked
        cache = self._rope_cache(T)[positions].transpose(0, 1).contiguous()  # [T, B, rot/2, 2]
        h = F.embedding(input_ids, self.sd["transformer.embedding.word_embeddings.weight"]).transpose(0, 1)
        for i in range(self.num_layers):
            p = f"transformer.encoder.layers.{i}"
            x = self._rms_norm(h, p + ".input_layernorm")
            h = h + self._attention(x, cache, mask, i)
            x = self._rms_norm(h, p + ".post_attention_layernorm")
            inter = F.linear(x, self.sd[p + ".mlp.dense_h_to_4h.weight"])
            a, b = torch.chunk(inter, 2, dim=-1)
            h = h + F.linear(F.silu(a) * b, self.sd[p + ".mlp.dense_4h_to_h.weight"])
        h = self._rms_norm(h, "transformer.encoder.final_layernorm")
        return F.linear(h, self.sd["transformer.output_layer.weight"]).transpose(0, 1).float()
