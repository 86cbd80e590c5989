"""Tiny random transformers `glm` / `glm4` models, saved once per test module, as the reference
for glmrt's whole-model parity tests.

The models are small (vocab 256, hidden 64, 3 layers) so that every test file runs in seconds, but
they exercise every feature of the real ones: grouped KV heads (4 heads on 2 groups), partial
(half-dim, interleaved) RoPE with a non-default base, q/k/v biases (non-zero), RMSNorm weights that
are not all ones, an untied LM head, and real eos / pad ids inside the vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ckpt_writers import HFCase, make_case  # noqa: E402


@pytest.fixture(scope="module", params=["glm", "glm4"])
def hf_case(request, tmp_path_factory) -> HFCase:
    return make_case(request.param, tmp_path_factory.mktemp(f"hf_{request.param}"))


@pytest.fixture(scope="module")
def glm_case(tmp_path_factory) -> HFCase:
    """The transformers `glm` model only (the one with a THUDM-format equivalent)."""
    return make_case("glm", tmp_path_factory.mktemp("hf_glm"))
