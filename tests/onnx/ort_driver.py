"""Drive an exported directory with numpy and onnxruntime only, through the documented signature.

Nothing here imports glmrt: a caller that never installs glmrt reads glmrt_onnx.json, builds
input_ids / attention_mask / position_ids by the rule the manifest states, and feeds present.* back
as past_key_values.*. The position rules are written here from the README / manifest text, not
taken from glmrt's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

NP_DTYPE = {"float32": np.float32, "float16": np.float16}


class Export:
    def __init__(self, directory, *, optimization: str = "all", threads: int = 1):
        self.dir = Path(directory)
        self.manifest = json.loads((self.dir / "glmrt_onnx.json").read_text())
        cfg = self.manifest["config"]
        self.layers, self.kv_heads, self.head_dim = cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
        self.rule = self.manifest["position_ids"]["rule"]
        self.special = self.manifest["special_tokens"]
        self.dtype = NP_DTYPE[self.manifest["dtype"]]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                       "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
        for key, value in self.manifest.get("session_config", {}).items():
            so.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(self.dir / self.manifest["files"]["model"]), so,
                                            providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for _ in range(2 * self.layers)]

    def run(self, ids, mask, positions, past):
        """-> (logits float32 [B, S, V], present list in past order)."""
        feeds = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
                 "position_ids": np.asarray(positions, np.int64)}
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = dict(zip(self.output_names, self.session.run(None, feeds)))
        present = []
        for i in range(self.layers):
            present += [out[f"present.{i}.key"], out[f"present.{i}.value"]]
        return out["logits"], present

    # ------------------------------------------------------------------ the documented position rules
    def prompt_positions(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        B, T = ids.shape
        if self.rule == "causal":
            return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
        pos = np.zeros((B, T), np.int64)
        block = np.zeros((B, T), np.int64)
        for r in range(B):
            pad = int(T - mask[r].sum())
            real = list(ids[r, pad:])
            sop = real.index(self.special["sop"])
            gmask = self.special["gmask"] if self.special["gmask"] in real[:sop] else None
            anchor = real.index(gmask) if gmask is not None else real.index(self.special["mask"])
            for t in range(len(real)):
                if self.rule == "prefix-2d":
                    pos[r, pad + t] = t if t < sop else anchor
                    block[r, pad + t] = 0 if t < sop else t - sop + 1
                else:  # prefix-1d: plain with [gMASK]; <sop> on take the [MASK] position with [MASK]
                    pos[r, pad + t] = t if (t < sop or gmask is not None) else anchor
        return np.stack((pos, block), axis=1) if self.rule == "prefix-2d" else pos

    def next_positions(self, ids: np.ndarray, mask: np.ndarray, generated: int) -> np.ndarray:
        """Positions of the token fed back after ``generated`` tokens were produced ((B, 1) or (B, 2, 1)).
        ``ids``/``mask``: the prompt (left-padded)."""
        B, T = ids.shape
        if self.rule == "causal":
            return (mask.sum(-1) - 1 + 1 + generated)[:, None].astype(np.int64)
        out_pos, out_block = np.zeros((B, 1), np.int64), np.zeros((B, 1), np.int64)
        for r in range(B):
            pad = int(T - mask[r].sum())
            real = list(ids[r, pad:])
            sop = real.index(self.special["sop"])
            gmask = self.special["gmask"] if self.special["gmask"] in real[:sop] else None
            anchor = real.index(gmask) if gmask is not None else real.index(self.special["mask"])
            index = len(real) + generated  # index of the fed-back token among the row's real tokens
            if self.rule == "prefix-2d":
                out_pos[r, 0], out_block[r, 0] = anchor, index - sop + 1
            else:
                out_pos[r, 0] = index if gmask is not None else anchor
        return np.stack((out_pos, out_block), axis=1) if self.rule == "prefix-2d" else out_pos

    # ------------------------------------------------------------------ loops
    def prefill(self, ids, mask):
        ids, mask = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
        return self.run(ids, mask, self.prompt_positions(ids, mask), self.empty_past(ids.shape[0]))

    def decode(self, prompt_ids, prompt_mask, tokens):
        """Prefill, then feed ``tokens`` (B, n) one at a time; -> (prefill logits, [step logits (B, V)])."""
        prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int64), np.asarray(prompt_mask, np.int64)
        logits, past = self.prefill(prompt_ids, prompt_mask)
        mask = prompt_mask
        steps = []
        for j in range(tokens.shape[1]):
            mask = np.concatenate((mask, np.ones((mask.shape[0], 1), np.int64)), axis=1)
            step, past = self.run(tokens[:, j:j + 1], mask, self.next_positions(prompt_ids, prompt_mask, j), past)
            steps.append(step[:, -1])
        return logits, steps

    def greedy(self, prompt_ids, prompt_mask, n: int) -> np.ndarray:
        prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int64), np.asarray(prompt_mask, np.int64)
        logits, past = self.prefill(prompt_ids, prompt_mask)
        mask = prompt_mask
        out = []
        token = logits[:, -1].argmax(-1)
        for j in range(n):
            out.append(token)
            if j == n - 1:
                break
            mask = np.concatenate((mask, np.ones((mask.shape[0], 1), np.int64)), axis=1)
            logits, past = self.run(token[:, None], mask, self.next_positions(prompt_ids, prompt_mask, j), past)
            token = logits[:, -1].argmax(-1)
        return np.stack(out, axis=1)
