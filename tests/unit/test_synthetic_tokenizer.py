"""Synthetic tokenizers of the presets (glmrt.synthetic_tokenizer): each release's kind, with the
release's special tokens at the release's ids (GLM_FAMILY.md), inside the preset's vocabulary."""

import pytest

from glmrt.chat import build_prompt, stop_ids
from glmrt.models import PRESETS, config_from_dict
from glmrt.synthetic_tokenizer import PRESET_FAMILIES, synthetic_tokenizer

pytest.importorskip("sentencepiece")
pytest.importorskip("tiktoken")

RELEASE_IDS = {  # GLM_FAMILY.md
    "chatglm2": {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793},
    "chatglm3": {"[gMASK]": 64790, "sop": 64792, "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796,
                 "<|observation|>": 64797},
    "glm4": {"<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332, "<sop>": 151333,
             "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336, "<|assistant|>": 151337,
             "<|observation|>": 151338},
    "hf": {"<|endoftext|>": 151329, "[gMASK]": 151331, "<sop>": 151333, "<|user|>": 151336,
           "<|assistant|>": 151337, "<|observation|>": 151338},
    "chatglm-6b": {"[MASK]": 130000, "[gMASK]": 130001, "<sop>": 130004, "<eop>": 130005},
    "glm-130b": {"[MASK]": 150000, "[gMASK]": 150001, "[sMASK]": 150002, "sop": 150004, "eop": 150005},
}
EOS = {"chatglm2": 2, "chatglm3": 2, "glm4": 151329, "hf": 151329, "chatglm-6b": 130005, "glm-130b": 20002}


@pytest.mark.parametrize("family", sorted(RELEASE_IDS))
def test_specials_sit_at_the_release_ids(family):
    if family == "hf":
        pytest.importorskip("tokenizers")
    tok = synthetic_tokenizer(family)
    for name, expected in RELEASE_IDS[family].items():
        assert tok.special[name] == expected, name
    assert tok.eos_id == EOS[family]
    text = "你好, world!\n  tab\tend"
    assert tok.decode(tok.encode(text)) == text
    if family == "chatglm3":
        assert tok.encode("\n") == [30910, 13]  # SentencePiece's dummy prefix, as the release
    # ids of the embedding's padding rows (past the tokenizer) have no text
    assert tok.decode(tok.encode("ok") + [tok.vocab_size + 5]) == "ok"


@pytest.mark.parametrize("preset", sorted(PRESET_FAMILIES))
def test_every_preset_has_one_and_it_fits_the_vocabulary(preset):
    family = PRESET_FAMILIES[preset]
    if family == "hf":
        pytest.importorskip("tokenizers")
    _, cfg = config_from_dict(dict(PRESETS[preset]))
    tok = synthetic_tokenizer(family)
    assert tok.vocab_size <= cfg.vocab_size
    assert set(cfg.eos_token_ids) <= set(stop_ids(family, tok)) | {tok.eos_id}
    if cfg.gmask_token_id is not None and family != "hf":
        assert tok.special["[gMASK]"] == cfg.gmask_token_id
    if family != "glm-130b":
        prompt = build_prompt(family, tok, [{"role": "user", "content": "hi"}])
        assert max(prompt) < cfg.vocab_size
