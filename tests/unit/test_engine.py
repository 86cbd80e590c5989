"""The serving engine (glmrt.engine): continuous batching against independent references.

References: Model.generate on each prompt alone (another code path: a whole-prompt prefill and a
scalar-position decode), and the engine running each request alone. On the CPU in float32 the
tokens must be equal exactly, whatever the batch (the native attention reads each row's own key
count; the float GEMV computes rows alike at any row count)."""

from __future__ import annotations

import pytest
import torch

from glmrt import _native
from glmrt.api import _fuse, synthetic_weights
from glmrt.backends import get_backend
from glmrt.engine import Engine, QueueFullError, Request
from glmrt.errors import InputError
from glmrt.graph import build_graph
from glmrt.lowering import lower
from glmrt.model import Model
from glmrt.models import config_from_dict
from glmrt.ops import ForwardContext
from glmrt.sampling import SamplingParams

CHATGLM3 = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": 2, "hidden_size": 64,
            "ffn_hidden_size": 96, "kv_channels": 16, "num_attention_heads": 4, "multi_query_attention": True,
            "multi_query_group_num": 2, "padded_vocab_size": 384, "layernorm_epsilon": 1e-5, "rmsnorm": True,
            "add_qkv_bias": True, "seq_length": 256, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}
GLM4_0414 = {"model_type": "glm4", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": 384,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "attention_bias": True,
             "max_position_embeddings": 256, "tie_word_embeddings": False, "eos_token_id": [1],
             "pad_token_id": 0, "torch_dtype": "float32"}
CHATGLM6B = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": 384, "hidden_size": 64,
             "num_layers": 2, "num_attention_heads": 4, "inner_hidden_size": 128, "layernorm_epsilon": 1e-5,
             "max_sequence_length": 256, "position_encoding_2d": True, "bos_token_id": 380, "eos_token_id": 381,
             "mask_token_id": 376, "gmask_token_id": 377, "pad_token_id": 3, "torch_dtype": "float32"}
GLM130B = {"model_type": "glm-130b", "num_layers": 2, "hidden_size": 64, "inner_hidden_size": 96, "vocab_size": 384,
           "num_attention_heads": 4, "max_sequence_length": 256, "fp16": False,
           "token_ids": {"mask": 376, "gmask": 377, "smask": 378, "sop": 380, "eop": 381, "eos": 2}}
GENERATIONS = {"chatglm3": CHATGLM3, "glm4-0414": GLM4_0414, "chatglm-6b": CHATGLM6B, "glm-130b": GLM130B}


def tiny_model(raw: dict, seed: int = 3, scale: float = 4.0, kernels: str = "auto") -> Model:
    """A float32 model on the cpu backend with random weights (scaled up so greedy choices are clear)."""
    _, cfg = config_from_dict(dict(raw))
    graph = build_graph(cfg, torch.float32)
    weights = synthetic_weights(graph, seed=seed)
    for name, spec in graph.params.items():
        if spec.role == "linear" or spec.role == "embedding":
            weights[name] = weights[name] * scale
    backend = get_backend("cpu")
    graph = _fuse(graph, backend, True)
    return Model(cfg, graph, lower(graph, backend, weights, kernels=kernels), weights, "tiny")


def prompts_for(model: Model, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    out = []
    for n in lengths:
        ids = torch.randint(4, 370, (n,), generator=g).tolist()
        out.append(model.build_inputs(ids) if cfg.mask_kind == "prefix" else ids)
    return out


@pytest.fixture(scope="module", params=sorted(GENERATIONS))
def model(request):
    return tiny_model(GENERATIONS[request.param])


def test_engine_equals_generate_for_every_generation(model):
    """Prompts of different lengths (no padding), more prompts than slots: each prompt's tokens are
    exactly Model.generate's on that prompt alone (positions, 2-D RoPE and the prefix mask included)."""
    prompts = prompts_for(model, (5, 17, 9, 30, 3))
    engine = Engine(model, max_batch=3, max_len=64)
    out = engine.generate(prompts, max_new_tokens=8, eos_token_id=[])
    for prompt, tokens in zip(prompts, out):
        expected = model.generate([prompt], max_new_tokens=8, eos_token_id=[])[0, len(prompt):].tolist()
        assert tokens == expected
    assert engine.snapshot()["slots_used"] == 0


def test_batched_decode_plan_marks_attention_per_row(model):
    engine = Engine(model, max_batch=2, max_len=32)
    attention = [s for s in engine.decode_plan.steps if s.node.op == "attention"]
    assert attention and all(s.node.attrs["per_row_cache"] for s in attention)
    assert not any(s.node.attrs.get("per_row_cache") for s in model.plan.steps)  # the model's own plan is untouched
    if _native.load("_native_cpu")[0] is not None:
        assert all(s.impl == "native.attention" for s in attention)


def test_staggered_arrivals_equal_each_request_alone():
    """Requests join and leave mid-decode (arrivals on different steps, different max_new_tokens,
    chunked prefill): every request's tokens equal the same request run alone in the engine."""
    model = tiny_model(CHATGLM3)
    prompts = prompts_for(model, (40, 6, 23, 11, 3, 31, 8, 17), seed=1)
    lengths = [7, 3, 10, 6, 9, 2, 11, 5]
    alone = [Engine(model, max_batch=1, max_len=64, prefill_chunk=8).generate([p], n, eos_token_id=[])[0]
             for p, n in zip(prompts, lengths)]
    engine = Engine(model, max_batch=4, max_len=64, prefill_chunk=8, prefill_budget=16)
    requests = []
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        requests.append(engine.submit(Request(prompt, n)))
        for _ in range(i % 3):
            engine.step()
    while engine.has_work():
        engine.step()
    assert [r.tokens for r in requests] == alone
    assert all(r.finish_reason == "length" for r in requests)


def test_seeded_sampling_is_the_same_whatever_the_batch():
    model = tiny_model(CHATGLM3, scale=1.0)
    prompts = prompts_for(model, (7, 13, 4, 19), seed=2)
    seeds = [11, 12, 13, 14]
    kwargs = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, eos_token_id=[])
    batched = Engine(model, max_batch=4, max_len=48).generate(prompts, 8, seed=seeds, **kwargs)
    for prompt, seed, tokens in zip(prompts, seeds, batched):
        assert Engine(model, max_batch=1, max_len=48).generate([prompt], 8, seed=seed, **kwargs)[0] == tokens
        # and what Model.generate samples with the same seed
        assert model.generate([prompt], 8, seed=seed, **kwargs)[0, len(prompt):].tolist() == tokens
    assert len({tuple(t) for t in batched}) == len(batched)


def test_stop_tokens_and_callbacks():
    model = tiny_model(CHATGLM3)
    prompt = prompts_for(model, (9,))[0]
    free = model.generate([prompt], max_new_tokens=8, eos_token_id=[])[0, len(prompt):].tolist()
    engine = Engine(model, max_batch=2, max_len=32)
    stop_at = free[3]
    first = free.index(stop_at)
    seen, finished = [], []
    request = Request(prompt, 8, stop_ids=frozenset({stop_at}), on_token=seen.append,
                      on_finish=lambda reason, error: finished.append(reason))
    engine.submit(request)
    while engine.has_work():
        engine.step()
    assert request.tokens == free[:first + 1] == seen and finished == ["stop"]
    # on_token returning True stops the request (the server's stop strings)
    stopped = Request(prompt, 8, on_token=lambda token: len(stopped.tokens) == 2)
    engine.submit(stopped)
    while engine.has_work():
        engine.step()
    assert stopped.tokens == free[:2] and stopped.finish_reason == "stop"


def test_cancel_frees_the_slot_and_the_others_go_on():
    model = tiny_model(CHATGLM3)
    prompts = prompts_for(model, (5, 12, 8), seed=3)
    alone = [Engine(model, max_batch=1, max_len=48).generate([p], 10, eos_token_id=[])[0] for p in prompts]
    engine = Engine(model, max_batch=3, max_len=48)
    requests = [engine.submit(Request(p, 10)) for p in prompts]
    for _ in range(3):
        engine.step()
    assert engine.snapshot()["slots_used"] == 3
    engine.cancel(requests[0])
    engine.step()
    assert requests[0].finish_reason == "cancelled" and engine.snapshot()["slots_used"] == 2
    waiting = engine.submit(Request(prompts[0], 10))  # takes the freed slot
    while engine.has_work():
        engine.step()
    assert [r.tokens for r in requests[1:]] == alone[1:]
    assert waiting.tokens == alone[0]
    assert engine.snapshot()["slots_used"] == 0


def test_bad_requests_and_a_full_queue():
    model = tiny_model(CHATGLM3)
    engine = Engine(model, max_batch=1, max_len=16, max_waiting=2)
    with pytest.raises(InputError, match="positions of a slot"):
        engine.submit(Request([5] * 10, 7))
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.submit(Request([5, 999], 2))
    with pytest.raises(InputError, match="empty"):
        engine.submit(Request([], 2))
    engine.submit(Request([5, 6], 2))
    engine.submit(Request([5, 6], 2))
    with pytest.raises(QueueFullError):
        engine.submit(Request([5, 6], 2))
    prefix = Engine(tiny_model(CHATGLM6B), max_batch=1, max_len=16)
    with pytest.raises(InputError, match="gMASK"):
        prefix.submit(Request([5, 6, 7], 2))  # a ChatGLM-6B prompt needs [gMASK] <sop>


def test_engine_thread_serves_generate():
    model = tiny_model(GLM4_0414)
    prompts = prompts_for(model, (6, 14, 9), seed=4)
    engine = Engine(model, max_batch=2, max_len=48)
    engine.start()
    try:
        out = engine.generate(prompts, 6, eos_token_id=[])
    finally:
        engine.stop()
    for prompt, tokens in zip(prompts, out):
        assert tokens == model.generate([prompt], 6, eos_token_id=[])[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- kernels under the engine
needs_native = pytest.mark.glmrt_native(available=_native.load("_native_cpu")[0] is not None,
                                        reason="glmrt._native_cpu is not built")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 2), (8, 2), (32, 2), (4, 4)])
def test_native_attention_rows_read_their_own_key_count(dtype, heads):
    """kv_lens: each row of a batch at different cache lengths is bit for bit the row alone over
    exactly its keys (without it the padded rows' softmax sums run in another order)."""
    module, _ = _native.load("_native_cpu")
    from glmrt.backends.cpu import native_ops
    nh, nkv = heads
    hd, B = 16, 5
    lens = [37, 3, 16, 29, 50]
    S = max(lens)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, nh, hd, generator=g).to(dtype)
    keys = torch.randn(B, nkv, 64, hd, generator=g).to(dtype)
    values = torch.randn(B, nkv, 64, hd, generator=g).to(dtype)
    node = type("N", (), {})()
    node.name, node.attrs = "attn", {"num_heads": nh, "num_kv_heads": nkv, "head_dim": hd, "scale": hd ** -0.5,
                                     "scaling": "standard", "layer_index": 0, "per_row_cache": True}

    class Cache:
        pass

    def run(rows, pos):
        cache = Cache()
        cache.k, cache.v = [keys[rows].clone()], [values[rows].clone()]
        cpos = torch.tensor(pos)
        k_new = cache.k[0][torch.arange(len(rows)), :, cpos][:, None]  # rewrite what is there already
        v_new = cache.v[0][torch.arange(len(rows)), :, cpos][:, None]
        width = int(cpos.max()) + 1
        allowed = (torch.arange(width)[None, :] <= cpos[:, None])[:, None, None, :]
        ctx = ForwardContext(positions=None, allowed=allowed, cache=cache, cache_positions=cpos)
        return native_ops.attention(ctx, node, [q[rows], k_new, v_new], {})

    batched = run(list(range(B)), [n - 1 for n in lens])
    for b in range(B):
        alone = run([b], [lens[b] - 1])
        assert torch.equal(batched[b], alone[0]), f"row {b} (keys {lens[b]} of {S})"


@needs_native
def test_float_gemv_rows_are_independent_of_the_row_count():
    """Under row_invariant the float linear takes the GEMV in chunks for any row count, so each
    row is what it is alone (F.linear's GEMM for > 8 rows sums in another order)."""
    from glmrt.backends.cpu import kernels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 1, 96, generator=g)
    w = torch.randn(200, 96, generator=g)
    bias = torch.randn(200, generator=g)
    node = type("N", (), {"name": "lin", "attrs": {}})()
    ctx = ForwardContext(positions=None, allowed=None, row_invariant=True)
    batched = kernels.native_float_linear(ctx, node, [x], {"weight": w, "bias": bias})
    for i in range(13):
        alone = kernels.native_float_linear(ctx, node, [x[i:i + 1]], {"weight": w, "bias": bias})
        assert torch.equal(batched[i], alone[0])
    plain = ForwardContext(positions=None, allowed=None)
    assert torch.allclose(kernels.native_float_linear(plain, node, [x], {"weight": w, "bias": bias}), batched,
                          atol=1e-4)


def test_reference_kernels_run_the_engine_too():
    """kernels='reference' (every node on the torch reference, which writes per-row positions in
    glmrt.ops.update_kv_cache): the engine runs and agrees with Model.generate on the tokens."""
    model = tiny_model(CHATGLM6B, kernels="reference")
    prompts = prompts_for(model, (4, 11, 7), seed=5)
    engine = Engine(model, max_batch=3, max_len=40)
    assert all(s.kind == "reference" for s in engine.decode_plan.steps)
    out = engine.generate(prompts, 8, eos_token_id=[])
    for prompt, tokens in zip(prompts, out):
        assert tokens == model.generate([prompt], 8, eos_token_id=[])[0, len(prompt):].tolist()


def test_sampling_params_reach_each_request():
    model = tiny_model(CHATGLM3, scale=1.0)
    prompt = prompts_for(model, (6,), seed=6)[0]
    engine = Engine(model, max_batch=2, max_len=32)
    greedy = engine.submit(Request(prompt, 6))
    sampled = engine.submit(Request(prompt, 6, SamplingParams(True, 1.5, 0, 1.0, 1.0, 7)))
    while engine.has_work():
        engine.step()
    assert greedy.tokens == model.generate([prompt], 6, eos_token_id=[])[0, len(prompt):].tolist()
    assert sampled.tokens == model.generate([prompt], 6, do_sample=True, temperature=1.5, seed=7,
                                            eos_token_id=[])[0, len(prompt):].tolist()
