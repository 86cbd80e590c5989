"""GLM-130B, from a SwissArmyTransformer (SAT) checkpoint directory as released.

Layout: `latest` (the iteration), `<iter>/mp_rank_XX_model_states.pt` (1 or 8 tensor-parallel
ranks, each `{"module": state_dict}`), plus the model-arguments script in the shape of the
GLM-130B repository's `configs/model_glm_130b.sh` (`--num-layers 70 --hidden-size 12288 ...`).

Architecture (SAT's glm130B_model.py): DeepNorm with alpha = sqrt(2 * num_layers), LayerNorm with
bias, per-head interleaved fused QKV (within each rank; ranks hold consecutive heads), 1-D RoPE
over the whole head with NeoX pairing and fp16 tables, layer-scaled attention with fp32 softmax,
GeGLU with the SECOND half activated (erf GELU), every linear with bias, LM head tied to the
embedding, bidirectional prefix up to `<sop>`.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import torch

from ..config import GLMConfig
from ..errors import CheckpointError, ConfigError
from .chatglm6b import deinterleave_qkv
from .common import WeightMap, quantization_bit, require

MODEL_TYPES = ("glm-130b",)

# icetk's ids, as GLM-130B was released; glmrt.load(..., token_ids={...}) overrides them.
ICETK_TOKEN_IDS = {"mask": 150000, "gmask": 150001, "smask": 150002, "sop": 150004, "eop": 150005, "eos": 20002}


def matches(raw: dict) -> bool:
    return raw.get("model_type") == "glm-130b"


def config_from_dict(raw: dict) -> GLMConfig:
    require(raw, ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"), "GLM-130B")
    hidden, heads, layers = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_layers"])
    if raw.get("no_glu"):
        raise ConfigError("--no-glu GLM-130B variants are not supported: the released model uses GeGLU")
    ids = dict(ICETK_TOKEN_IDS, **(raw.get("token_ids") or {}))
    head_dim = hidden // heads
    two_d = bool(raw.get("position_encoding_2d", False))
    return GLMConfig(
        generation="glm-130b",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        ffn_hidden_size=int(raw.get("inner_hidden_size") or 4 * hidden * 2 // 3),
        max_positions=int(raw.get("max_sequence_length", 2048)),
        norm_kind="layernorm",
        norm_eps=float(raw.get("layernorm_epsilon", 1e-5)),
        norm_placement="deepnorm",
        residual_alpha=math.sqrt(2 * int(raw.get("full_num_layers", layers))),
        rope_kind="2d" if two_d else "half",
        rotary_dim=head_dim,
        rope_base=10000.0,
        rope_table_dtype="float16",  # SAT rounds inv_freq to fp16 whatever --fp16 says
        qkv_bias=True, dense_bias=True, mlp_bias=True,
        row_bias_after_matmul=True,  # SAT's RowParallelLinear: matmul, (all-reduce,) then + bias
        activation="geglu",
        mask_kind="prefix",
        attention_scaling="layer_scaled",
        tie_word_embeddings=True,
        eos_token_ids=(ids["eop"], ids["eos"]),
        pad_token_id=int(raw.get("pad_token_id", ids["eos"])),
        gmask_token_id=ids["gmask"],
        mask_token_id=ids["mask"],
        sop_token_id=ids["sop"],
        torch_dtype="bfloat16" if raw.get("bf16") else "float16",
        source_model_type="glm-130b",
    )


# The rotary embedding's inv_freq buffer, as the SAT versions GLM-130B ran on save it. It is not a
# parameter (SAT's RotaryEmbedding never loads it back, and glmrt computes the tables itself), so
# these names are ignored, whatever their shape, and no other name is.
ROTARY_BUFFER_NAMES = (
    # One per layer, in the attention module: the layout GLM-130B's tools/convert_tp.py knows
    # ("attention.rotary_emb.inv_freq" among the tensors copied unchanged to every rank).
    r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq",
    # SwissArmyTransformer 0.2.12 (GLM-130B's pinned version): one per rank in the model's
    # 'rotary-embedding' mixin (BaseModel.mixins is a ModuleDict). convert_tp.py does not list it as
    # replicated, so a checkpoint merged to fewer ranks holds it concatenated.
    r"mixins\.rotary-embedding\.rotary_emb\.inv_freq",
)


def weight_map(cfg: GLMConfig) -> WeightMap:
    m = WeightMap(ignore=ROTARY_BUFFER_NAMES)
    m.add("embed.weight", "transformer.word_embeddings.weight")
    qkv = deinterleave_qkv(cfg.num_heads, cfg.head_dim)
    for i in range(cfg.num_layers):
        src, dst = f"transformer.layers.{i}", f"layers.{i}"
        for part in ("weight", "bias"):
            m.add(f"{dst}.attn_norm.{part}", f"{src}.input_layernorm.{part}")
            m.add(f"{dst}.attn.qkv.{part}", f"{src}.attention.query_key_value.{part}", combine=qkv)
            m.add(f"{dst}.attn.dense.{part}", f"{src}.attention.dense.{part}")
            m.add(f"{dst}.mlp_norm.{part}", f"{src}.post_attention_layernorm.{part}")
            m.add(f"{dst}.mlp.up.{part}", f"{src}.mlp.dense_h_to_4h.{part}")
            m.add(f"{dst}.mlp.down.{part}", f"{src}.mlp.dense_4h_to_h.{part}")
    m.add("final_norm.weight", "transformer.final_layernorm.weight")
    m.add("final_norm.bias", "transformer.final_layernorm.bias")
    return m


# --------------------------------------------------------------------------- the SAT directory
def is_sat_dir(directory: Path) -> bool:
    return (directory / "latest").is_file() or any(directory.glob("*/mp_rank_*_model_states.pt"))


_ARG_KEYS = {  # script flag -> raw config key (value type)
    "num-layers": ("num_layers", int), "hidden-size": ("hidden_size", int),
    "inner-hidden-size": ("inner_hidden_size", int), "vocab-size": ("vocab_size", int),
    "num-attention-heads": ("num_attention_heads", int), "max-sequence-length": ("max_sequence_length", int),
    "model-parallel-size": ("model_parallel_size", int), "layernorm-epsilon": ("layernorm_epsilon", float),
    "layernorm-order": ("layernorm_order", str), "tokenizer-type": ("tokenizer_type", str),
    "quantization-bit-width": ("quantization_bit_width", int),
}
_FLAGS = {"fp16": "fp16", "bf16": "bf16", "position-encoding-2d": "position_encoding_2d", "no-glu": "no_glu"}


def parse_model_args(text: str, source: str = "script") -> dict:
    """The MODEL_ARGS of a configs/model_glm_130b.sh-style script -> raw config dict."""
    variables: dict[str, str] = {}
    for name, value in re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=(\S+)", text, flags=re.M):
        variables[name] = value.strip("'\"")
    text = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda mt: variables.get(mt.group(1), mt.group(0)), text)
    text = text.replace("\\\n", " ")
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as exc:
        raise ConfigError(f"cannot parse {source}: {exc}") from exc
    # MODEL_ARGS="--a 1 --b 2" arrives as one token, and its first flag as "MODEL_ARGS=--a".
    tokens = [t for tok in tokens for t in tok.split()]
    tokens = [t.split("=", 1)[1] if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=--", t) else t for t in tokens]
    raw: dict = {"model_type": "glm-130b"}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        flag = tok[2:] if tok.startswith("--") else None
        if flag in _ARG_KEYS:
            key, typ = _ARG_KEYS[flag]
            if i + 1 >= len(tokens):
                raise ConfigError(f"{source}: --{flag} has no value")
            try:
                raw[key] = typ(tokens[i + 1])
            except ValueError:
                raise ConfigError(f"{source}: --{flag} {tokens[i + 1]!r} is not a {typ.__name__}") from None
            i += 2
            continue
        if flag in _FLAGS:
            raw[_FLAGS[flag]] = True
        i += 1
    if "num_layers" not in raw:
        raise ConfigError(f"{source} has no --num-layers: it is not a GLM-130B model-arguments script")
    if raw.get("layernorm_order", "post") != "post":
        raise ConfigError(f"{source}: --layernorm-order {raw['layernorm_order']} is not GLM-130B's DeepNorm ('post')")
    return raw


def read_model_args(directory: Path) -> dict:
    scripts = [p for p in sorted(directory.glob("*.sh")) if "--num-layers" in p.read_text(errors="replace")]
    if not scripts:
        raise CheckpointError(
            f"{directory} is a SwissArmyTransformer checkpoint but holds no model-arguments script: copy the GLM-130B "
            "repository's configs/model_glm_130b.sh (with --num-layers, --hidden-size, ...) into it")
    if len(scripts) > 1:
        raise CheckpointError(f"{directory} holds several model-arguments scripts ({', '.join(p.name for p in scripts)}): "
                              "keep the one that matches the checkpoint")
    return parse_model_args(scripts[0].read_text(), scripts[0].name)


def checkpoint_quantization(raw: dict) -> int | None:
    """`--quantization-bit-width 4|8` in the model script (configs/model_glm_130b_int4.sh). GLM-130B
    then either quantizes the FP16 checkpoint on load, or, with `--from-quantized-checkpoint`, loads
    rank files that hold `<key>` int8 (INT4 packed two per byte, even index in the high nibble) plus
    `<key>_scale` fp16 for qkv, attention.dense, dense_h_to_4h and dense_4h_to_h. Which of the two a
    directory holds is read from its tensors (see glmrt.load)."""
    return quantization_bit(raw, "quantization_bit_width", "GLM-130B")


def shard_scale_group(shard_columns: int) -> int:
    """GLM-130B quantizes each tensor-parallel rank on its own, so a row-parallel layer
    (attention.dense, dense_4h_to_h: split along its input columns) has one scale per (row, rank):
    merged, that is group-wise quantization with groups of K / ranks columns. glmrt stores it with
    the largest power-of-two group dividing K / ranks (the scales repeated), which the kernels index
    with shifts; the numbers are the same."""
    return shard_columns & -shard_columns


def quant_layout(graph, bits: int, ranks: int, scale_dtype):
    """node name -> QuantSpec for a quantized SAT checkpoint merged from `ranks` rank files."""
    from ..quant import QuantSpec, quantizable_linears
    layout = {}
    for name in quantizable_linears(graph):
        group = 0
        if ranks > 1 and (name.endswith("attn.dense") or name.endswith("mlp.down")):
            k = graph.params[f"{name}.weight"].shape[1]
            if k % ranks:
                raise CheckpointError(f"{name}: {k} input columns do not split over {ranks} tensor-parallel ranks")
            group = shard_scale_group(k // ranks)
        layout[name] = QuantSpec(bits, group, scale_dtype)
    return layout


class SATShards:
    """A merged view over the tensor-parallel ranks of one SAT iteration, with the same interface
    as glmrt.checkpoint.WeightFiles (names, shape, get, files, directory)."""

    def __init__(self, directory: Path, expected_ranks: int | None = None):
        self.directory = directory
        # Set by glmrt.load for a quantized checkpoint: the bit width, which sizes the per-rank
        # scale groups of the row-parallel layers (see shard_scale_group).
        self.quant_bits: int | None = None
        iteration_dir = self._iteration_dir(directory)
        paths = sorted(iteration_dir.glob("mp_rank_*_model_states.pt"))
        ranks = sorted(int(re.search(r"mp_rank_(\d+)", p.name).group(1)) for p in paths)
        if ranks != list(range(len(ranks))):
            raise CheckpointError(f"{iteration_dir} has ranks {ranks}: some mp_rank_XX_model_states.pt files are missing")
        if expected_ranks and len(paths) != expected_ranks:
            raise CheckpointError(f"the model script says --model-parallel-size {expected_ranks} but {iteration_dir} "
                                  f"holds {len(paths)} rank file(s)")
        self.shards = [self._load(p) for p in paths]
        names = set(self.shards[0])
        for p, shard in zip(paths[1:], self.shards[1:]):
            if set(shard) != names:
                diff = sorted(set(shard) ^ names)[:5]
                raise CheckpointError(f"{p.name} holds different tensors than {paths[0].name} (e.g. {diff}); "
                                      "the ranks come from different checkpoints")
        self._paths = paths
        self._names = names
        from ..checkpoint import _is_zip
        self._mapped = {p for p in paths if _is_zip(p)}  # torch.load memory-mapped these
        self.selected: tuple[int, int] | None = None  # (size, rank) after select_ranks

    @staticmethod
    def _iteration_dir(directory: Path) -> Path:
        latest = directory / "latest"
        if latest.is_file():
            iteration = latest.read_text().strip()
            if not (directory / iteration).is_dir():
                raise CheckpointError(f"{latest} names iteration {iteration!r} but {directory / iteration} does not exist")
            return directory / iteration
        candidates = sorted({p.parent for p in directory.glob("*/mp_rank_*_model_states.pt")})
        if len(candidates) != 1:
            raise CheckpointError(f"{directory} has no 'latest' file and {len(candidates)} iteration folders: add "
                                  "'latest' naming the iteration to load")
        return candidates[0]

    @staticmethod
    def _load(path: Path) -> dict:
        from ..checkpoint import load_pickle
        state = load_pickle(path)
        if isinstance(state, dict) and isinstance(state.get("module"), dict):
            state = state["module"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a SAT state dict ({{'module': ...}})")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    # How each tensor is split across ranks (SAT's column/row-parallel layers). A quantized weight's
    # scale follows its weight's rows; for a row-parallel layer every rank has its own scale per row.
    @staticmethod
    def _rule(name: str) -> str:
        if name.endswith("word_embeddings.weight") or name.endswith("query_key_value.weight") \
                or name.endswith("query_key_value.bias") or name.endswith("query_key_value.weight_scale"):
            return "rows"
        if name.endswith("dense_h_to_4h.weight") or name.endswith("dense_h_to_4h.bias") \
                or name.endswith("dense_h_to_4h.weight_scale"):
            return "glu_rows"  # each rank holds [x1 shard; x2 shard]
        if name.endswith("attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
            return "columns"  # INT4: each rank packs its own (even) column count, so bytes concatenate too
        if name.endswith("attention.dense.weight_scale") or name.endswith("dense_4h_to_h.weight_scale"):
            return "rank_groups"
        return "replicated"

    def _merge(self, name: str, parts: list) -> torch.Tensor:
        rule = self._rule(name)
        if len(parts) == 1 or rule == "replicated":
            return parts[0]
        if rule == "rows":
            return torch.cat(parts, dim=0)
        if rule == "columns":
            return torch.cat(parts, dim=1)
        if rule == "rank_groups":  # (N,) per rank -> (N, ranks * repeat): see shard_scale_group
            weight = self.shards[0][name.removesuffix("_scale")]
            bits = self.quant_bits or 8
            cols = weight.shape[1] * (2 if bits == 4 else 1)
            repeat = cols // shard_scale_group(cols)
            return torch.stack(parts, dim=1).repeat_interleave(repeat, dim=1)
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)

    def select_ranks(self, size: int, rank: int) -> bool:
        """Keep only the rank files tensor-parallel rank ``rank`` of ``size`` needs, when the files
        split evenly over ``size`` (8 files at tp 8: the rank's own file; at tp 4: two consecutive
        files, merged). The merged view is then that rank's slice of the model, in SAT's own split
        (which glmrt.shard's matches: heads, [x1_r | x2_r], columns, vocabulary rows). Returns False
        (all files kept, for slicing the merged view) when they do not split evenly."""
        n = len(self.shards)
        if n % size or size > n:
            return False
        k = n // size
        self.shards = self.shards[rank * k:(rank + 1) * k]
        self._paths = self._paths[rank * k:(rank + 1) * k]
        self.selected = (size, rank)
        return True

    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        metas = [torch.empty(s[name].shape, device="meta") for s in self.shards]
        return tuple(self._merge(name, metas).shape)

    def get(self, name: str) -> torch.Tensor:
        return self._merge(name, [s[name] for s in self.shards])

    def release(self, name: str) -> None:
        """As WeightFiles.release: tensor ``name`` was consumed; drop its memory-mapped pages."""
        from ..checkpoint import drop_mapped_pages
        for path, shard in zip(self._paths, self.shards):
            if path in self._mapped:
                drop_mapped_pages(shard[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.shards[0][name].dtype

    @property
    def ranks(self) -> int:
        return len(self.shards)

    def files(self) -> list[Path]:
        return list(self._paths)
