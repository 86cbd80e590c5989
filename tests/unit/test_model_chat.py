"""The chat API end to end on tiny THUDM-format checkpoints that ship a tokenizer: the tokenizer
family is found from the files, prompts follow the release's format, replies stream as text."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import glmrt
from glmrt.api import synthetic_weights
from glmrt.chat import build_prompt, stop_ids
from glmrt.errors import InputError
from glmrt.graph import build_graph
from glmrt.models import config_from_dict


def write_random_checkpoint(directory, raw: dict):
    """config.json + random weights under the release's tensor names (single-source name maps)."""
    (directory / "config.json").write_text(json.dumps(raw))
    generation, cfg = config_from_dict(raw)
    weights = synthetic_weights(build_graph(cfg), seed=7)
    tensors = {}
    for canonical, src in generation.weight_map(cfg).sources.items():
        parts = weights[canonical].split(list(src.part_rows)) if src.part_rows else [weights[canonical]]
        tensors.update({name: part.contiguous() for name, part in zip(src.names, parts)})
    save_file(tensors, str(directory / "model.safetensors"))


def write_thudm_checkpoint(directory, vocab: int, specials: dict, eos):
    write_random_checkpoint(directory, {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 2, "hidden_size": 32,
        "ffn_hidden_size": 48, "kv_channels": 8, "num_attention_heads": 4, "multi_query_attention": True,
        "multi_query_group_num": 2, "padded_vocab_size": vocab, "layernorm_epsilon": 1e-5, "rmsnorm": True,
        "add_qkv_bias": True, "seq_length": 512, "eos_token_id": eos, "pad_token_id": 0, "torch_dtype": "float32"})


@pytest.fixture(scope="module")
def chatglm3_ckpt(sp_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm3_ckpt")
    shutil.copy(sp_dir / "tokenizer.model", d / "tokenizer.model")
    # ChatGLM3's tokenizer files name its role tokens; that is how it is told from ChatGLM2.
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens": ["<|observation|>"]}))
    import sentencepiece
    n = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).vocab_size()
    write_thudm_checkpoint(d, vocab=n + 16, specials={}, eos=2)
    return d


@pytest.fixture(scope="module")
def glm4_ckpt(tiktoken_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("glm4_ckpt")
    shutil.copy(tiktoken_dir / "tokenizer.model", d / "tokenizer.model")
    ranks = len((d / "tokenizer.model").read_text().splitlines())
    write_thudm_checkpoint(d, vocab=ranks + 16, specials={}, eos=[ranks, ranks + 7, ranks + 9])
    return d


@pytest.mark.parametrize("fixture,family", [("chatglm3_ckpt", "chatglm3"), ("glm4_ckpt", "glm4")])
def test_load_finds_the_tokenizer_family(fixture, family, request):
    model = glmrt.load(request.getfixturevalue(fixture), dtype="float32", progress=False)
    assert model.chat_family == family and model.tokenizer is not None


@pytest.mark.parametrize("fixture", ["chatglm3_ckpt", "glm4_ckpt"])
def test_chat_matches_generate_on_the_release_prompt(fixture, request):
    model = glmrt.load(request.getfixturevalue(fixture), dtype="float32", progress=False)
    messages = [{"role": "user", "content": "你好, how are you?"}]
    reply = model.chat(messages, max_new_tokens=12)
    assert set(reply) >= {"role", "content", "tool_calls", "malformed_tool_call", "token_ids"}
    prompt = build_prompt(model.chat_family, model.tokenizer, messages)
    stops = stop_ids(model.chat_family, model.tokenizer)
    out = model.generate([prompt], 12, eos_token_id=stops)[0, len(prompt):].tolist()
    # The whole reply: every token generate gives up to its first stop id (which chat drops), or all
    # 12 when none comes -- an early end of chat, or a token past the stop, fails.
    first_stop = next((i for i, t in enumerate(out) if t in stops), len(out))
    assert out[first_stop + 1:] == [], "generate ran past a stop id"
    assert reply["token_ids"] == out[:first_stop]
    streamed = "".join(model.chat_stream(messages, max_new_tokens=12))
    assert streamed == model.tokenizer.decode(reply["token_ids"])


def test_build_inputs_places_specials_like_the_release():
    model = glmrt.load("synthetic:chatglm3-6b", layers=1, dtype="bfloat16", progress=False)
    assert model.build_inputs([5, 6]) == [64790, 64792, 5, 6]
    # presets carry a synthetic tokenizer of their release's kind (glmrt.synthetic_tokenizer)
    assert model.chat_family == "chatglm3" and model.tokenizer.special["<|assistant|>"] == 64796
    reply = model.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert set(reply) >= {"content", "tool_calls", "token_ids"}
    model.tokenizer = None
    with pytest.raises(InputError, match="no tokenizer"):
        model.chat([{"role": "user", "content": "hi"}])


def test_prefix_generation_appends_specials():
    model = glmrt.load("synthetic:chatglm-6b", layers=1, dtype="float32", progress=False)
    ids = model.build_inputs([5, 6, 7])
    assert ids == [5, 6, 7, 130001, 130004]
    out = model.generate(ids, 3)
    assert out.shape == (1, 8) and torch.equal(out[0, :5], torch.tensor(ids))


TINY_CHATGLM6B = {"model_type": "chatglm", "vocab_size": 300, "hidden_size": 64, "num_layers": 2,
                  "num_attention_heads": 4, "inner_hidden_size": 128, "position_encoding_2d": True,
                  "max_sequence_length": 256, "bos_token_id": 294, "eos_token_id": 295, "mask_token_id": 290,
                  "gmask_token_id": 291, "pad_token_id": 3, "torch_dtype": "float32"}
TINY_GLM4 = {"model_type": "glm4", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
             "max_position_embeddings": 256, "eos_token_id": [299], "pad_token_id": 0, "torch_dtype": "float32"}


@pytest.mark.parametrize("raw", [TINY_GLM4, TINY_CHATGLM6B], ids=["glm4", "chatglm-6b"])
def test_static_decode_equals_eager_decode(raw, tmp_path):
    """The fixed-shape decode step (what CUDA graphs capture) gives the eager step's tokens."""
    write_random_checkpoint(tmp_path, raw)
    model = glmrt.load(tmp_path, progress=False)
    if raw is TINY_GLM4:
        model.config = model.config.replace(gmask_token_id=1, sop_token_id=2)  # only for build_inputs below
    base = [5, 6, 7, 8, 9]
    ids = torch.tensor([model.build_inputs(base), model.build_inputs([11] + base[1:])])
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    model.decode_mode = "eager"
    eager = model.generate(ids, 6, attention_mask=mask, eos_token_id=[])
    model.decode_mode = "static"
    static = model.generate(ids, 6, attention_mask=mask, eos_token_id=[])
    again = model.generate(ids, 6, attention_mask=mask, eos_token_id=[])  # reuses the kept cache
    assert torch.equal(eager, static) and torch.equal(static, again)


def test_graph_decode_on_a_device_without_graph_capture_says_what_to_use(tmp_path):
    write_random_checkpoint(tmp_path, TINY_GLM4)
    model = glmrt.load(tmp_path, progress=False)
    if model.device.type in ("cuda", "npu"):
        pytest.skip("this device has graph capture")
    model.decode_mode = "graph"
    with pytest.raises(glmrt.errors.InputError, match="decode_mode='static' or 'eager'"):
        model.generate(torch.tensor([[5, 6, 7]]), 3, eos_token_id=[])
