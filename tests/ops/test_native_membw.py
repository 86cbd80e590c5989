"""The memory-bandwidth probe of glmrt._native_cpu (what benchmarks divide weight bytes/s by)."""

import os

import pytest
import torch

from glmrt import _native

module, why = _native.load("_native_cpu")
if module is None and os.environ.get("GLMRT_REQUIRE_NATIVE") != "1":
    pytest.skip(f"glmrt._native_cpu not built: {why}", allow_module_level=True)


@pytest.mark.parametrize("words,threads", [(8, 1), (8 * 37, 2), (8 * 1000 + 8, 2), (1 << 20, 0)])
def test_read_stream_reads_every_byte_once(words, threads):
    g = torch.Generator().manual_seed(words)
    x = torch.randint(-(2**62), 2**62, (words,), dtype=torch.int64, generator=g)
    want = sum(int(v) for v in x.tolist()) % 2**64 if words < 100000 else int(x.sum()) % 2**64
    assert module.read_stream(x.data_ptr(), words * 8, threads) % 2**64 == want
    # every word matters: changing one changes the checksum by exactly that much
    x[words // 2] += 1
    assert module.read_stream(x.data_ptr(), words * 8, threads) % 2**64 == (want + 1) % 2**64


def test_read_stream_refuses_a_partial_cache_line():
    x = torch.zeros(16, dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple of 64"):
        module.read_stream(x.data_ptr(), 100, 1)
    assert module.read_stream_isa() in ("avx512", "avx2", "scalar")


def test_bench_uses_the_native_probe():
    from glmrt.bench.machine import cpu_read_bandwidth
    r = cpu_read_bandwidth(1, buffer_bytes=64 << 20, repeats=2)
    assert r["method"].startswith("native read_stream") and "torch.sum" in r["method"]
    assert r["bytes_per_s"] > 0 and r["buffer_bytes"] == 64 << 20
