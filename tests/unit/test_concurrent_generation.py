"""Generations in flight never share state: two stream() generators advanced alternately in one
thread, and several threads generating on one Model, give every call exactly the tokens it gives
alone, in every decode mode (static decoding is what CUDA graphs capture, so the graph mode runs
the same leasing code; its own test needs CUDA)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from tiny_models import TINY_GLM4, write_checkpoint

import glmrt

NEW = 8
PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42, 43, 44], [100, 7, 230, 18, 3]]
# Sampling makes every step depend on the logits (a corrupted cache changes the tokens), and the
# per-call seed makes the runs repeatable.
SAMPLING = dict(do_sample=True, temperature=1.5, seed=3, eos_token_id=[])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # N(0, 0.4) weights: logits that depend on the context, so a generation reading another's cache shows.
    return glmrt.load(write_checkpoint(tmp_path_factory.mktemp("tiny_glm4"), TINY_GLM4, scale=20), progress=False)


def alone(model, prompt, n=NEW):
    return [int(t[0]) for t in model.stream([prompt], n, **SAMPLING)]


@pytest.fixture(params=["eager", "static"])
def mode(request, model):
    model.decode_mode = request.param
    yield request.param
    model.decode_mode = "auto"


def test_the_prompts_give_different_tokens(model, mode):
    """Otherwise the tests below could not see one generation reading another's cache."""
    outs = [alone(model, p) for p in PROMPTS]
    assert len({tuple(o) for o in outs}) == len(PROMPTS)
    assert outs[0] == alone(model, PROMPTS[0])  # repeatable


def test_interleaved_generators_equal_each_alone(model, mode):
    want = [alone(model, p) for p in PROMPTS[:2]]
    a, b = (model.stream([p], NEW, **SAMPLING) for p in PROMPTS[:2])
    got = [[], []]
    for _ in range(NEW):
        got[0].append(int(next(a)[0]))
        got[1].append(int(next(b)[0]))
    assert got == want


def test_a_generator_started_midway_through_another(model, mode):
    want = [alone(model, p) for p in PROMPTS[:2]]
    a = model.stream([PROMPTS[0]], NEW, **SAMPLING)
    first = [int(next(a)[0]) for _ in range(5)]
    second = alone(model, PROMPTS[1])  # a whole generation while `a` is suspended
    first += [int(t[0]) for t in a]
    assert [first, second] == want


def test_closed_and_collected_generators_leave_later_calls_right(model, mode):
    want = alone(model, PROMPTS[2])
    a = model.stream([PROMPTS[0]], NEW, **SAMPLING)
    next(a)
    a.close()
    b = model.stream([PROMPTS[1]], NEW, **SAMPLING)
    next(b)
    del b
    gc.collect()
    assert alone(model, PROMPTS[2]) == want


def test_static_decoders_are_leased_exclusively_and_one_is_kept(model):
    model.decode_mode = "static"
    try:
        a, b = (model.stream([p], NEW, **SAMPLING) for p in PROMPTS[:2])
        next(a), next(b)
        assert model._idle_decoder is None  # both in flight, each with its own decoder
        list(a)
        kept = model._idle_decoder[1]
        list(b)
        assert model._idle_decoder[1] is not kept  # one idle decoder at a time (caches are large)
        reused = model._idle_decoder[1]
        alone(model, PROMPTS[2])
        assert model._idle_decoder[1] is reused  # the next call of the same shape reuses it
    finally:
        model.decode_mode = "auto"


def test_threads_generating_on_one_model_equal_sequential_runs(model, mode):
    want = {i: alone(model, p) for i, p in enumerate(PROMPTS)}
    rounds = 2
    start = threading.Barrier(len(PROMPTS))
    got: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
    errors: list[BaseException] = []

    def work(i):
        try:
            start.wait(timeout=30)
            for _ in range(rounds):
                out = model.generate([PROMPTS[i]], NEW, **SAMPLING)[0, len(PROMPTS[i]):].tolist()
                got[i].append(out)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a generation thread hung"
    assert not errors, errors
    assert got == {i: [w] * rounds for i, w in want.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph decoding needs CUDA")
def test_graph_mode_interleaved_and_threaded_on_cuda(tmp_path):
    gpu = glmrt.load(write_checkpoint(tmp_path, TINY_GLM4, scale=20), backend="cuda", progress=False)
    gpu.decode_mode = "eager"
    want = [alone(gpu, p) for p in PROMPTS[:2]]
    gpu.decode_mode = "graph"
    assert [alone(gpu, p) for p in PROMPTS[:2]] == want
    a, b = (gpu.stream([p], NEW, **SAMPLING) for p in PROMPTS[:2])
    got = [[], []]
    for _ in range(NEW):
        got[0].append(int(next(a)[0]))
        got[1].append(int(next(b)[0]))
    assert got == want
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, alone(gpu, PROMPTS[i])), daemon=True)
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(0), results.get(1)] == want
