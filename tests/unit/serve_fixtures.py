"""Tiny checkpoints and a server process for the `glmrt serve` tests.

``scripted_checkpoint`` writes a THUDM-format model whose greedy output is a chosen token chain
whatever the prompt: every layer's attention output and MLP down projection are zero, so the last
hidden state is the embedding of the current token; chain token j embeds as the unit vector e_j and
the LM head maps e_j to the next token of the chain. That is how the tool-call tests get a real
model (real engine, real decoding) that writes a tool call."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmrt.api import synthetic_weights
from glmrt.graph import build_graph
from glmrt.models import config_from_dict


def thudm_config(vocab: int, eos, layers: int = 2) -> dict:
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": layers, "hidden_size": 32,
            "ffn_hidden_size": 48, "kv_channels": 8, "num_attention_heads": 4, "multi_query_attention": True,
            "multi_query_group_num": 2, "padded_vocab_size": vocab, "layernorm_epsilon": 1e-5, "rmsnorm": True,
            "add_qkv_bias": True, "seq_length": 512, "eos_token_id": eos, "pad_token_id": 0,
            "torch_dtype": "float32"}


def save_checkpoint(directory: Path, raw: dict, weights: dict) -> None:
    (directory / "config.json").write_text(json.dumps(raw))
    generation, cfg = config_from_dict(raw)
    tensors = {}
    for canonical, src in generation.weight_map(cfg).sources.items():
        parts = weights[canonical].split(list(src.part_rows)) if src.part_rows else [weights[canonical]]
        tensors.update({name: part.contiguous() for name, part in zip(src.names, parts)})
    save_file(tensors, str(directory / "model.safetensors"))


def random_checkpoint(directory: Path, raw: dict, seed: int = 7, scale: float = 3.0) -> None:
    _, cfg = config_from_dict(raw)
    graph = build_graph(cfg)
    weights = synthetic_weights(graph, seed=seed)
    for name, spec in graph.params.items():
        if spec.role in ("linear", "embedding"):
            weights[name] = weights[name] * scale  # clearer greedy choices than N(0, 0.02)
    save_checkpoint(directory, raw, weights)


def scripted_checkpoint(directory: Path, raw: dict, chain: list[int]) -> None:
    _, cfg = config_from_dict(raw)
    if len(chain) - 1 > cfg.hidden_size or len(set(chain)) != len(chain):
        raise ValueError("the chain needs distinct tokens, at most hidden_size + 1 of them")
    graph = build_graph(cfg)
    weights = synthetic_weights(graph, seed=5)
    for i in range(cfg.num_layers):
        weights[f"layers.{i}.attn.dense.weight"].zero_()
        weights[f"layers.{i}.mlp.down.weight"].zero_()
    weights["final_norm.weight"].fill_(1.0)
    head = torch.zeros_like(weights["lm_head.weight"])
    for j, (token, successor) in enumerate(zip(chain, chain[1:])):
        weights["embed.weight"][token] = 0.0
        weights["embed.weight"][token, j] = 1.0
        head[successor, j] = 10.0
    weights["lm_head.weight"] = head
    save_checkpoint(directory, raw, weights)


CORPUS = ["Hello world, this is a tiny corpus for a tiny tokenizer.", "你好，世界！今天天气很好。",
          "What's the weather in Beijing? numbers 123 456", "be brief, how are you?"]


def train_sentencepiece(path: Path, **options) -> None:
    """A ChatGLM2/3-style tokenizer.model (BPE, dummy prefix, byte fallback, identity normalizer)."""
    import io
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=model, model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, minloglevel=2, num_threads=1,
        **options)
    path.write_bytes(model.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m glmrt serve ...` on a free 127.0.0.1 port; start() waits for /health 200."""

    def __init__(self, model: str, *args: str, name: str = "tiny"):
        import httpx
        self.port = free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "glmrt", "serve", model, "--port", str(self.port), "--dtype", "float32",
             "--backend", "cpu", "--served-model-name", name, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd="/")
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def start(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"glmrt serve exited with {self.proc.returncode}:\n{self.proc.stdout.read().decode()}")
            try:
                if self.http.get("/health", timeout=2).status_code == 200:
                    return self
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"glmrt serve did not become healthy within {timeout} s")

    def client(self, **kwargs):
        import openai
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=60, **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        text = self.http.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
                return float(line.split()[-1])
        raise KeyError(name + labels)

    def rss_bytes(self) -> int:
        """RssAnon + VmSwap of the server process (what a leak grows; file-backed pages do not count)."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return sum(int(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("RssAnon", "VmSwap"))

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
