"""The baselines glmrt is compared with: what a user would otherwise run, built from the same
weights. `transformers` runs GlmForCausalLM / Glm4ForCausalLM.generate; `torch-eager` is a minimal
transformers-style nn.Module with a plain greedy loop. Each says why it cannot run a model.
"""

from __future__ import annotations

import math

from ..errors import GLMRTError
from .machine import _transformers_version
from .metrics import TokenClock


BASELINES = ("transformers", "torch-eager")
BASELINE_CHOICES = ("auto", "none") + BASELINES


BASELINE_LABELS = {
    "transformers": "transformers {version} {cls}.generate (eager attention, DynamicCache grown with torch.cat, "
                    "greedy), built from the same weights",
    "torch-eager": "plain torch eager: a minimal transformers-style nn.Module (nn.Embedding / nn.Linear, fused qkv, "
                   "matmul + softmax attention, KV cache grown with torch.cat every step, greedy loop under "
                   "torch.no_grad), built from the same weights",
}


def transformers_incompatibility(cfg) -> str | None:
    """Why transformers' GlmForCausalLM / Glm4ForCausalLM cannot run this config (None: it can)."""
    checks = [
        (cfg.norm_kind == "rmsnorm", f"norm {cfg.norm_kind}"),
        (cfg.norm_placement in ("pre", "sandwich"), f"norm placement {cfg.norm_placement}"),
        (cfg.rope_kind == "interleaved", f"RoPE {cfg.rope_kind}"),
        (cfg.activation == "swiglu", f"activation {cfg.activation}"),
        (cfg.mask_kind == "causal", f"mask {cfg.mask_kind}"),
        (cfg.attention_scaling == "standard", f"attention scaling {cfg.attention_scaling}"),
        (not cfg.dense_bias and not cfg.mlp_bias, "biases on the attention output or MLP"),
    ]
    bad = [what for ok, what in checks if not ok]
    if bad:
        return f"transformers' Glm/Glm4ForCausalLM has no {', '.join(bad)} (model generation {cfg.generation})"
    return None


def resolve_baselines(requested: list[str], model_cfg) -> tuple[list[str], list[dict]]:
    """(baselines to run, skipped rows) from the --baseline list."""
    wanted: list[str] = []
    skipped = []
    for name in requested:
        if name == "none":
            continue
        if name == "auto":
            ok = _transformers_version() is not None and transformers_incompatibility(model_cfg) is None
            name = "transformers" if ok else "torch-eager"
        if name in wanted:
            continue
        if name == "transformers":
            why = ("the transformers package is not installed" if _transformers_version() is None
                   else transformers_incompatibility(model_cfg))
            if why:
                skipped.append({"setting": "transformers baseline", "reason": why})
                continue
        wanted.append(name)
    return wanted, skipped


class BaselineUnavailable(GLMRTError):
    """A baseline cannot run this model (the reason is in the message)."""


def eager_incompatibility(cfg) -> str | None:
    bad = []
    if cfg.rope_kind == "2d":
        bad.append("2-D RoPE")
    if cfg.mask_kind != "causal":
        bad.append(f"{cfg.mask_kind} mask")
    if cfg.attention_scaling != "standard":
        bad.append(f"{cfg.attention_scaling} attention")
    return f"the torch-eager baseline has no {', '.join(bad)}" if bad else None


def _eager_modules():
    """The minimal transformers-style eager model (defined lazily: importing glmrt.bench needs no torch.nn)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    def frozen(t):
        # Parameters as from_pretrained leaves them (requires_grad=True), run under torch.no_grad() as
        # users do. (On the CPU this also matters for speed: torch 2.13's F.linear takes a ~50x slower
        # path for a sliced 3-D input such as h[:, -1:] when the weight does not require grad.)
        return nn.Parameter(t)

    def linear(weight, bias=None) -> nn.Linear:
        out_f, in_f = weight.shape
        layer = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        layer.weight = frozen(weight)
        if bias is not None:
            layer.bias = frozen(bias)
        return layer

    class Norm(nn.Module):
        def __init__(self, cfg, weight, bias=None):
            super().__init__()
            self.kind, self.eps, self.round = cfg.norm_kind, cfg.norm_eps, cfg.rmsnorm_round_before_weight
            self.weight = frozen(weight)
            self.bias = frozen(bias) if bias is not None else None

        def forward(self, x):
            if self.kind == "layernorm":
                return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            if self.round:
                return self.weight * h.to(x.dtype)
            return (self.weight.float() * h).to(x.dtype)

    def rotate(x, cos, sin, interleaved: bool):
        """x (B, H, T, hd); cos/sin (T, rotary_dim/2). The first rotary_dim dims rotate."""
        rd = cos.shape[-1] * 2
        rot, rest = x[..., :rd], x[..., rd:]
        if interleaved:  # pairs (2i, 2i+1)
            c, s = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
            turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        else:  # halves
            c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
            a, b = rot.chunk(2, -1)
            turned = torch.cat((-b, a), -1)
        return torch.cat((rot * c + turned * s, rest), -1)

    class Attention(nn.Module):
        def __init__(self, cfg, w, prefix):
            super().__init__()
            self.cfg = cfg
            self.qkv = linear(w[f"{prefix}.qkv.weight"], w.get(f"{prefix}.qkv.bias"))
            self.dense = linear(w[f"{prefix}.dense.weight"], w.get(f"{prefix}.dense.bias"))

        def forward(self, x, cos, sin, mask, past):
            cfg = self.cfg
            B, T, _ = x.shape
            nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            q, k, v = self.qkv(x).split((nh * hd, nkv * hd, nkv * hd), dim=-1)
            q = q.view(B, T, nh, hd).transpose(1, 2)
            k = k.view(B, T, nkv, hd).transpose(1, 2)
            v = v.view(B, T, nkv, hd).transpose(1, 2)
            interleaved = cfg.rope_kind == "interleaved"
            q, k = rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)
            if past is not None:  # the growing cache: a new, longer tensor every step
                k = torch.cat((past[0], k), dim=2)
                v = torch.cat((past[1], v), dim=2)
            present = (k, v)
            if nh != nkv:
                k = k.repeat_interleave(nh // nkv, dim=1)
                v = v.repeat_interleave(nh // nkv, dim=1)
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, nh * hd)
            return self.dense(out), present

    class MLP(nn.Module):
        def __init__(self, cfg, w, prefix):
            super().__init__()
            self.kind = cfg.activation
            self.up = linear(w[f"{prefix}.up.weight"], w.get(f"{prefix}.up.bias"))
            self.down = linear(w[f"{prefix}.down.weight"], w.get(f"{prefix}.down.bias"))

        def forward(self, x):
            h = self.up(x)
            if self.kind == "swiglu":
                a, b = h.chunk(2, dim=-1)
                h = F.silu(a) * b
            elif self.kind == "geglu":
                a, b = h.chunk(2, dim=-1)
                h = a * F.gelu(b)
            else:
                h = F.gelu(h, approximate="tanh")
            return self.down(h)

    class Block(nn.Module):
        def __init__(self, cfg, w, i):
            super().__init__()
            p = f"layers.{i}"
            self.placement, self.alpha = cfg.norm_placement, cfg.residual_alpha
            self.attn_norm = Norm(cfg, w[f"{p}.attn_norm.weight"], w.get(f"{p}.attn_norm.bias"))
            self.attn = Attention(cfg, w, f"{p}.attn")
            self.mlp_norm = Norm(cfg, w[f"{p}.mlp_norm.weight"], w.get(f"{p}.mlp_norm.bias"))
            self.mlp = MLP(cfg, w, f"{p}.mlp")
            if self.placement == "sandwich":
                self.attn_out_norm = Norm(cfg, w[f"{p}.attn_out_norm.weight"])
                self.mlp_out_norm = Norm(cfg, w[f"{p}.mlp_out_norm.weight"])

        def forward(self, h, cos, sin, mask, past):
            x = self.attn_norm(h)
            a, present = self.attn(x, cos, sin, mask, past)
            if self.placement == "sandwich":
                a = self.attn_out_norm(a)
            h = (x * self.alpha if self.placement == "deepnorm" else h) + a
            x = self.mlp_norm(h)
            m = self.mlp(x)
            if self.placement == "sandwich":
                m = self.mlp_out_norm(m)
            return (x * self.alpha if self.placement == "deepnorm" else h) + m, present

    class EagerGLM(nn.Module):
        def __init__(self, cfg, w):
            super().__init__()
            self.cfg = cfg
            self.embed = nn.Embedding.from_pretrained(w["embed.weight"], freeze=False)
            self.layers = nn.ModuleList(Block(cfg, w, i) for i in range(cfg.num_layers))
            self.final_norm = Norm(cfg, w["final_norm.weight"], w.get("final_norm.bias")) if cfg.final_norm else None
            head = w["embed.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
            self.lm_head = linear(head)

        def forward(self, ids, past=None, last_only=False):
            cfg = self.cfg
            T = ids.shape[1]
            start = 0 if past is None else past[0][0].shape[2]
            h = self.embed(ids)
            positions = torch.arange(start, start + T, device=ids.device, dtype=torch.float32)
            inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.rotary_dim, 2, device=ids.device,
                                                             dtype=torch.float32) / cfg.rotary_dim))
            angles = positions[:, None] * inv_freq[None, :]
            cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
            mask = None
            if T > 1:
                mask = torch.full((T, start + T), torch.finfo(h.dtype).min, device=ids.device, dtype=h.dtype)
                mask = torch.triu(mask, diagonal=start + 1)
            presents = []
            for i, layer in enumerate(self.layers):
                h, present = layer(h, cos, sin, mask, None if past is None else past[i])
                presents.append(present)
            if self.final_norm is not None:
                h = self.final_norm(h)
            if last_only:
                h = h[:, -1:]
            return self.lm_head(h), presents

    return EagerGLM


class EagerRunner:
    """The torch-eager baseline: a plain greedy loop over the minimal nn.Module."""

    runner = "torch-eager"

    def __init__(self, cfg, weights: dict, device):
        import torch
        why = eager_incompatibility(cfg)
        if why:
            raise BaselineUnavailable(why)
        self.module = _eager_modules()(cfg, weights).to(device).eval()
        self.device = torch.device(device)
        self.label = BASELINE_LABELS["torch-eager"]

    def parameter_bytes(self) -> int:
        return _unique_bytes(self.module.parameters())

    def generate(self, prompt, gen_len: int, clock: TokenClock) -> None:
        import torch
        with torch.no_grad():
            ids = prompt.to(self.device)
            logits, past = self.module(ids, last_only=True)
            for step in range(gen_len):
                token = logits[:, -1].argmax(-1)
                clock.tick(token)
                if step == gen_len - 1:
                    break
                logits, past = self.module(token[:, None], past, last_only=True)

    def logits(self, prompt):
        import torch
        with torch.no_grad():
            return self.module(prompt.to(self.device))[0].float()


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class TransformersRunner:
    """The transformers baseline: GlmForCausalLM (Glm4ForCausalLM for sandwich norms) with the same
    weights, run with model.generate() the way a transformers user runs it."""

    runner = "transformers"

    def __init__(self, cfg, weights: dict, device):
        import torch
        why = transformers_incompatibility(cfg)
        if why:
            raise BaselineUnavailable(why)
        try:
            import transformers
        except ImportError as exc:
            raise BaselineUnavailable(f"the transformers package does not import: {exc}") from None
        sandwich = cfg.norm_placement == "sandwich"
        config_cls = transformers.Glm4Config if sandwich else transformers.GlmConfig
        model_cls = transformers.Glm4ForCausalLM if sandwich else transformers.GlmForCausalLM
        dtype = weights["embed.weight"].dtype
        self.vocab_size = cfg.vocab_size
        self.pad_token_id = cfg.pad_token_id
        hf_config = config_cls(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            partial_rotary_factor=cfg.rotary_dim / cfg.head_dim, rope_theta=cfg.rope_base,
            attention_bias=cfg.qkv_bias, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=cfg.pad_token_id,
            eos_token_id=list(cfg.eos_token_ids) or None)
        hf_config._attn_implementation = "eager"
        state = self.state_dict(cfg, weights)
        model = self._build(model_cls, hf_config, state, dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.label = BASELINE_LABELS["transformers"].format(version=transformers.__version__, cls=model_cls.__name__)
        self._stopping = (transformers.StoppingCriteria, transformers.StoppingCriteriaList)

    @staticmethod
    def state_dict(cfg, w: dict) -> dict:
        """glmrt's canonical names -> transformers' glm / glm4 names (q/k/v split from the fused qkv)."""
        out = {"model.embed_tokens.weight": w["embed.weight"], "model.norm.weight": w["final_norm.weight"]}
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = w["lm_head.weight"]
        sizes = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        for i in range(cfg.num_layers):
            src, dst = f"layers.{i}", f"model.layers.{i}"
            out[f"{dst}.input_layernorm.weight"] = w[f"{src}.attn_norm.weight"]
            for part in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                q, k, v = w[f"{src}.attn.qkv.{part}"].split(sizes, dim=0)
                out[f"{dst}.self_attn.q_proj.{part}"] = q
                out[f"{dst}.self_attn.k_proj.{part}"] = k
                out[f"{dst}.self_attn.v_proj.{part}"] = v
            out[f"{dst}.self_attn.o_proj.weight"] = w[f"{src}.attn.dense.weight"]
            out[f"{dst}.post_attention_layernorm.weight"] = w[f"{src}.mlp_norm.weight"]
            out[f"{dst}.mlp.gate_up_proj.weight"] = w[f"{src}.mlp.up.weight"]
            out[f"{dst}.mlp.down_proj.weight"] = w[f"{src}.mlp.down.weight"]
            if cfg.norm_placement == "sandwich":
                out[f"{dst}.post_self_attn_layernorm.weight"] = w[f"{src}.attn_out_norm.weight"]
                out[f"{dst}.post_mlp_layernorm.weight"] = w[f"{src}.mlp_out_norm.weight"]
        return out

    @staticmethod
    def _build(model_cls, hf_config, state: dict, dtype):
        """The model with `state` as its parameters, without a random initialisation of real-width
        matrices: built on the meta device, parameters assigned, then the (computed, not stored)
        rotary buffers rebuilt on the CPU."""
        import torch
        with torch.device("meta"):
            model = model_cls(hf_config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (hf_config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise BaselineUnavailable(f"transformers weight mapping is off: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
        if hf_config.tie_word_embeddings:
            model.tie_weights()
        for name, module in list(model.named_modules()):
            if any(b.is_meta for b in module.buffers(recurse=False)):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, type(module)(config=hf_config))
        still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if still_meta:
            raise BaselineUnavailable(f"transformers model has tensors left on the meta device: {still_meta[:5]}")
        model.config.dtype = dtype
        return model

    def parameter_bytes(self) -> int:
        return _unique_bytes(self.model.parameters())

    def generate(self, prompt, gen_len: int, clock: TokenClock) -> None:
        import torch
        criteria_cls, list_cls = self._stopping

        class TokenTick(criteria_cls):
            """Called by generate() after every new token: records its time, never stops."""

            def __call__(self, input_ids, scores, **kwargs):
                clock.tick(input_ids[:, -1])
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        ids = prompt.to(self.device)
        with torch.no_grad():  # what generate() itself uses
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                                do_sample=False, eos_token_id=self.vocab_size + 7, pad_token_id=self.pad_token_id,
                                stopping_criteria=list_cls([TokenTick()]))

    def logits(self, prompt):
        import torch
        with torch.no_grad():
            return self.model(input_ids=prompt.to(self.device)).logits.float()
