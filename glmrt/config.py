"""GLMConfig: the one typed description of a GLM-family model.

Every generation of the family is this dataclass with different field values. The fields are the
axes along which the releases differ (see ../shared/GLM_FAMILY.md); the graph builder reads them and
nothing else, so a generation's differences live in one place: the `models/<generation>` module
that maps a checkpoint's own config.json onto these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError

NORM_KINDS = ("rmsnorm", "layernorm")
# pre: h = h + f(norm(h)).  residual_from_norm (DeepNorm, GLM-130B / ChatGLM-6B):
# h = norm(h) * alpha + f(norm(h)).  sandwich (GLM-4-0414): h = h + post_norm(f(norm(h))).
NORM_PLACEMENTS = ("pre", "deepnorm", "sandwich")
ROPE_KINDS = ("interleaved", "half", "2d")
ROPE_TABLE_DTYPES = ("float32", "float16")
ACTIVATIONS = ("swiglu", "geglu", "gelu_tanh")
MASK_KINDS = ("causal", "prefix")
ATTENTION_SCALINGS = ("standard", "layer_scaled")

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: Any) -> torch.dtype | None:
    """A torch dtype from a torch dtype, its name, or None (None passes through)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"unsupported dtype {dtype}: glmrt runs models in float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
    raise ConfigError(
        f"unsupported dtype {dtype!r}: use one of 'float32', 'bfloat16', 'float16' (or the torch dtype); "
        "for INT8/INT4 weights use quantization, not dtype"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class GLMConfig:
    """Shapes and semantics of one GLM-family model. All fields are explicit; no defaults hide a
    generation's behaviour except the ones every generation shares."""

    # Which release this is (a models/ generation name) and the config.json model_type it came from.
    generation: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    max_positions: int

    norm_kind: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_placement: str = "pre"
    # Multiplier of the residual branch in DeepNorm blocks (sqrt(2 * num_layers) in the releases).
    residual_alpha: float = 1.0
    # transformers' glm/glm4 RMSNorm rounds the normalized value to the model dtype before the
    # weight multiply; THUDM's code multiplies in fp32 and rounds once.
    rmsnorm_round_before_weight: bool = False
    final_norm: bool = True

    rope_kind: str = "interleaved"
    rotary_dim: int = 64
    rope_base: float = 10000.0
    # "float32": RoPE tables built in fp32 (ChatGLM2 and later). "float16": ChatGLM-6B / GLM-130B,
    # whose inv_freq is rounded to fp16 and the tables then built in the model's dtype (see
    # glmrt.ops.rope_tables: all fp16 in an fp16 model, fp32 products in an fp32 one).
    rope_table_dtype: str = "float32"

    qkv_bias: bool = True
    dense_bias: bool = False
    mlp_bias: bool = False
    # GLM-130B (SAT's RowParallelLinear, as Megatron's): the attention output and MLP down
    # projections compute the matmul, round it to the model dtype, then add the bias (a second
    # rounding), instead of the bias inside the matmul; under tensor parallelism the bias comes
    # after the all-reduce (glmrt.shard), at tp 1 right after the matmul (glmrt.lowering).
    row_bias_after_matmul: bool = False
    activation: str = "swiglu"
    mask_kind: str = "causal"
    attention_scaling: str = "standard"
    tie_word_embeddings: bool = False

    # Token ids the runtime needs. Generation stops at any of eos_token_ids.
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    # Prefix-masked generations (GLM-130B, ChatGLM-6B) find their mask boundary at these ids.
    gmask_token_id: int | None = None
    mask_token_id: int | None = None
    sop_token_id: int | None = None

    # The dtype the checkpoint was released in (used when load(dtype=None)).
    torch_dtype: str = "float32"
    source_model_type: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid config for {self.generation or 'model'}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_hidden_size", "max_positions"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.norm_kind in NORM_KINDS, f"norm_kind {self.norm_kind!r} not in {NORM_KINDS}")
        need(self.norm_placement in NORM_PLACEMENTS, f"norm_placement {self.norm_placement!r} not in {NORM_PLACEMENTS}")
        need(self.rope_kind in ROPE_KINDS, f"rope_kind {self.rope_kind!r} not in {ROPE_KINDS}")
        need(self.rope_table_dtype in ROPE_TABLE_DTYPES,
             f"rope_table_dtype {self.rope_table_dtype!r} not in {ROPE_TABLE_DTYPES}")
        need(self.activation in ACTIVATIONS, f"activation {self.activation!r} not in {ACTIVATIONS}")
        need(self.mask_kind in MASK_KINDS, f"mask_kind {self.mask_kind!r} not in {MASK_KINDS}")
        need(self.attention_scaling in ATTENTION_SCALINGS,
             f"attention_scaling {self.attention_scaling!r} not in {ATTENTION_SCALINGS}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(self.rope_base > 0, f"rope_base must be positive, got {self.rope_base}")
        need(0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
             f"rotary_dim ({self.rotary_dim}) must be even and at most head_dim ({self.head_dim})")
        if self.rope_kind == "2d":
            need(self.rotary_dim == self.head_dim and self.head_dim % 4 == 0,
                 "2-D RoPE rotates the whole head in two halves: rotary_dim must equal head_dim, a multiple of 4")
        if self.mask_kind == "prefix":
            need(self.gmask_token_id is not None and self.sop_token_id is not None,
                 "a prefix mask needs gmask_token_id and sop_token_id")
        need(self.torch_dtype in ("float32", "bfloat16", "float16"),
             f"torch_dtype {self.torch_dtype!r} is not float32, bfloat16 or float16")
        need(math.isfinite(self.residual_alpha) and self.residual_alpha > 0, "residual_alpha must be positive")

    # ---------------------------------------------------------------- derived
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def mlp_in_size(self) -> int:
        """Rows of the first MLP projection: two halves for gated activations."""
        return 2 * self.ffn_hidden_size if self.activation in ("swiglu", "geglu") else self.ffn_hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.torch_dtype]

    def replace(self, **changes: Any) -> "GLMConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("extra")
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    def num_parameters(self) -> int:
        h, v = self.hidden_size, self.vocab_size
        per_layer = (h * self.qkv_size + self.q_size * h + h * self.mlp_in_size + self.ffn_hidden_size * h)
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + head + self.num_layers * per_layer
