"""benchmarks/vs_llama_cpp.py: the logic that runs without building llama.cpp (arguments, the cmake
options from the CPU's flags, the GGUF file each format uses, llama-bench's JSON, the table). The
end-to-end evidence (llama.cpp's greedy tokens equal glmrt's on the same F32 file) is the script's
own cross-check, which needs the build."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_llama_cpp.py"


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vs_llama_cpp", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_defaults_and_lists(vs):
    a = vs.parse_args([])
    assert a.format_list == ["f16", "bf16", "q8_0", "q4_0"] and a.pp_list == [128, 512] and a.tg == 32
    assert a.threads == 2 and a.layers == 8 and a.work == "/work/llama-build"
    a = vs.parse_args(["--formats", "Q4_0, q4_0,f32", "--pp", "", "--tg", "16"])
    assert a.format_list == ["q4_0", "f32"] and a.pp_list == [] and a.tg == 16


@pytest.mark.parametrize("argv", [["--formats", "q4_k"], ["--formats", ","], ["--pp", "12x"], ["--pp", "0"],
                                  ["--pp", "", "--tg", "0"], ["--threads", "0"], ["--sdist", "a", "--src", "b"]])
def test_bad_arguments_are_refused(vs, argv, capsys):
    with pytest.raises(SystemExit) as e:
        vs.parse_args(argv)
    assert e.value.code != 0


def test_cmake_options_follow_the_cpu_and_never_enable_amx(vs):
    avx2_only = vs.cmake_options({"avx", "avx2", "fma", "f16c", "bmi2", "amx_tile", "amx_int8", "amx_bf16"})
    assert "-DGGML_AVX2=ON" in avx2_only and "-DGGML_AVX512=OFF" in avx2_only and "-DGGML_NATIVE=OFF" in avx2_only
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(avx2_only)
    assert not any("AMX" in o and o.endswith("=ON") for o in avx2_only)
    wide = vs.cmake_options({"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512vbmi"})
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AVX512_VBMI=ON"} <= set(wide)
    assert "-DGGML_CPU_REPACK=ON" in wide and "-DBUILD_SHARED_LIBS=ON" in wide
    # The build tree is keyed by source and options: another option set never reuses a cache.
    assert vs.build_dir_name("x.tar.gz", avx2_only) != vs.build_dir_name("x.tar.gz", wide)
    assert vs.build_dir_name("x.tar.gz", wide) == vs.build_dir_name("x.tar.gz", list(wide))


def test_gguf_file_choice(vs, tmp_path):
    # Quantized files keep the embedding and the LM head in F16 (the same bytes for both engines).
    assert vs.gguf_tensor_types("q4_0") == {"token_embd.weight": "F16", "output.weight": "F16"}
    assert vs.gguf_tensor_types("q8_0") == vs.gguf_tensor_types("q4_0")
    assert vs.gguf_tensor_types("bf16") == {} and vs.gguf_tensor_types("f32") == {}
    q4 = vs.gguf_file(tmp_path, 8, "q4_0")
    assert q4.parent == tmp_path / "gguf" and q4.name == "chatglm3-6b-L8-q4_0-embd-out-f16-seed0.gguf"
    assert vs.gguf_file(tmp_path, 28, "bf16").name == "chatglm3-6b-L28-bf16-seed0.gguf"
    names = {vs.gguf_file(tmp_path, layers, f).name for layers in (2, 8, 28) for f in vs.FORMATS}
    assert len(names) == 3 * len(vs.FORMATS)  # every model and format has its own file
    # glmrt runs each file in its own dtype / format.
    assert vs.FORMATS["f16"][1] == "float16" and vs.FORMATS["bf16"][1] == "bfloat16"
    assert vs.FORMATS["q4_0"][2] == "INT4-g32" and vs.FORMATS["q8_0"][2] == "INT8-g32"


def test_written_file_has_the_tensor_types_it_names(vs, tmp_path):
    gguf = pytest.importorskip("gguf")
    from glmrt.gguf_writer import write_gguf
    path = tmp_path / "tiny.gguf"
    cfg = {"model_type": "chatglm", "hidden_size": 64, "num_layers": 1, "num_attention_heads": 4,
           "multi_query_attention": True, "multi_query_group_num": 2, "kv_channels": 16, "ffn_hidden_size": 96,
           "padded_vocab_size": 320, "seq_length": 128, "layernorm_epsilon": 1e-5, "add_qkv_bias": True,
           "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
           "original_rope": True, "torch_dtype": "float16"}
    write_gguf(path, cfg, qtype="Q4_0", tensor_qtypes=vs.gguf_tensor_types("q4_0"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    # Bytes per decode step: everything but the embedding, plus one embedding row.
    reader = gguf.GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert vs.decode_read_bytes(path) == total - int(embd.n_bytes) + int(embd.n_bytes) // 320


def test_llama_bench_json(vs):
    text = json.dumps([{"n_prompt": 128, "n_gen": 0, "avg_ts": 50.5}, {"n_prompt": 512, "n_gen": 0, "avg_ts": 40.0},
                       {"n_prompt": 0, "n_gen": 32, "avg_ts": 9.25}, {"n_prompt": 16, "n_gen": 16, "avg_ts": 1.0}])
    assert vs.parse_llama_bench(text) == {"pp128": 50.5, "pp512": 40.0, "tg32": 9.25}


def _doc(vs):
    rows = []
    for fmt, (g_pp, l_pp, g_tg, l_tg) in {"bf16": (100.0, 50.0, 8.0, 7.0), "q4_0": (120.0, 100.0, 20.0, 10.0)}.items():
        row = {"format": fmt, "file": f"{fmt}.gguf", "file_bytes": 3e9, "decode_read_bytes": 2e9,
               "glmrt_weights": vs.FORMATS[fmt][2], "glmrt_dtype": vs.FORMATS[fmt][1],
               "glmrt_info": {"linear_impls": ["native.x"]}, "load_average": (1.0, 1.0, 1.0),
               "glmrt": vs.summarize([{"pp128": g_pp, "tg32": g_tg}, {"pp128": g_pp * 0.9, "tg32": g_tg}]),
               "llama_cpp": vs.summarize([{"pp128": l_pp, "tg32": l_tg}, {"pp128": l_pp, "tg32": l_tg * 1.1}])}
        row["speedup"] = {t: row["glmrt"][t]["median"] / row["llama_cpp"][t]["median"] for t in row["glmrt"]}
        for side in ("glmrt", "llama_cpp"):
            row[side]["tg32"]["fraction_of_bandwidth"] = 2e9 * row[side]["tg32"]["median"] / 40e9
        rows.append(row)
    return {"date": "2026-12-03", "commit": "abc", "command": "python benchmarks/vs_llama_cpp.py",
            "hardware": {"cpu": "CPU", "logical_cpus": 2, "threads": 2, "isa_flags": ["avx2"]},
            "llama_cpp": {"source": "llama_cpp_python-0.3.36.tar.gz", "build_commit": "0c1e570", "cmake_options": ["-DA=1"]},
            "settings": {"preset": "chatglm3-6b", "layers": 8, "rounds": 2, "threads": 2},
            "load_average_start": (0.5, 0.4, 0.3), "load_average_end": (0.6, 0.5, 0.4),
            "bandwidth": {"median_bytes_per_s": 40e9},
            "cross_check": {"layers": 2, "tokens": 2, "glmrt": [1, 2], "llama_cpp": [1, 2], "equal": True},
            "rows": rows}


def test_table_rendering(vs):
    text = vs.markdown(_doc(vs))
    assert "**equal**" in text and "`-DA=1`" in text and "0.50 / 0.40 / 0.30" in text
    # bf16: pp 95/50 = 1.90x (met), tg 8/7.35 = 1.09x (met); q4_0: pp 114/100 = 1.14x (not met), tg
    # 20/10.5 = 1.90x; INT4 pp / bf16 pp = 114/95 = 1.20x.
    bf_pp = next(line for line in text.splitlines() if line.startswith("| BF16") and "| pp128 |" in line)
    assert "1.90x" in bf_pp and ">= 1.5x met" in bf_pp and "95.00 [90.00-100.00]" in bf_pp
    q4_pp = next(line for line in text.splitlines() if line.startswith("| Q4_0") and "| pp128 |" in line)
    assert "1.14x" in q4_pp and "**not met**" in q4_pp
    q4_tg = next(line for line in text.splitlines() if line.startswith("| Q4_0") and "| tg32 |" in line)
    assert ">= 1.4x met" in q4_tg and "100%" in q4_tg  # 2 GB x 20 tokens/s of 40 GB/s
    assert "INT4-g32 pp128 / its bf16 pp128: 1.20x" in text and "at least as fast: met" in text
