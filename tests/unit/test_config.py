import pytest
import torch

from glmrt.config import parse_dtype
from glmrt.errors import ConfigError, UnsupportedModelError
from glmrt.models import PRESETS, config_from_dict


@pytest.mark.parametrize("value,want", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                        ("float16", torch.float16), (torch.bfloat16, torch.bfloat16), (None, None)])
def test_parse_dtype(value, want):
    assert parse_dtype(value) == want


@pytest.mark.parametrize("bad", ["int3", "float64x", torch.float64, 7])
def test_bad_dtype_is_named(bad):
    with pytest.raises(ConfigError, match="unsupported dtype"):
        parse_dtype(bad)


def test_thudm_glm4_9b_uses_rope_ratio():
    _, cfg = config_from_dict(dict(PRESETS["glm-4-9b"]))
    assert cfg.rope_base == 10000 * 500 and cfg.rotary_dim == 64 and cfg.num_kv_heads == 2
    assert cfg.norm_eps == 1.5625e-07 and cfg.eos_token_ids == (151329, 151336, 151338)
    assert not cfg.rmsnorm_round_before_weight


def test_hf_glm_follows_its_own_rope_theta():
    _, cfg = config_from_dict(dict(PRESETS["glm-4-9b-hf"]))
    assert cfg.rope_base == 10000.0 and cfg.rmsnorm_round_before_weight


def test_glm4_0414_is_sandwich():
    _, cfg = config_from_dict(dict(PRESETS["glm-4-9b-0414"]))
    assert cfg.norm_placement == "sandwich" and cfg.norm_eps == 1e-5


def test_chatglm3_widths():
    _, cfg = config_from_dict(dict(PRESETS["chatglm3-6b"]))
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.qkv_size) == \
        (28, 4096, 13696, 65024, 4608)
    assert 6.0e9 < cfg.num_parameters() < 6.5e9


def test_unknown_model_type_is_named():
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        config_from_dict({"model_type": "llama"})


def test_incomplete_config_names_missing_keys():
    with pytest.raises(ConfigError, match="num_layers"):
        config_from_dict({"model_type": "chatglm", "padded_vocab_size": 100, "hidden_size": 8})


def test_inconsistent_heads_rejected():
    raw = dict(PRESETS["chatglm3-6b"], multi_query_group_num=3)
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        config_from_dict(raw)
