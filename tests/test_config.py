import pytest

import splitnet
from splitnet.config import ConfigError, from_dict, to_dict
from splitnet.model.config import ModelConfig


def test_defaults_are_the_papers():
    c = ModelConfig()
    assert (c.layout, c.lrn_k, c.lrn_alpha, c.lrn_size, c.lrn_beta, c.lrn_convention) == \
        ("paper", 2.0, 1e-4, 5, 0.75, "paper")
    assert (c.dropout, c.dropout_mode, c.init_std, c.init_bias, c.input_mode) == (0.5, "paper", 0.01, 1.0, "pad3")


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match="lrn_kk: unknown key"):
        from_dict(ModelConfig, {"lrn_kk": 1})


def test_wrong_type_names_it():
    with pytest.raises(ConfigError, match="dropout: expected float"):
        from_dict(ModelConfig, {"dropout": "half"})
    with pytest.raises(ConfigError, match="lrn: expected bool"):
        from_dict(ModelConfig, {"lrn": 1})


def test_bad_choice_names_it():
    with pytest.raises(ConfigError, match="activation"):
        from_dict(ModelConfig, {"activation": "gelu"})
    with pytest.raises(ConfigError, match="input_mode"):
        splitnet.SplitAlexNet(num_classes=10, devices="cpu", input_mode="crop")


def test_roundtrip():
    c = from_dict(ModelConfig, {"lrn": False, "init_bias": 0.1, "init_bias_layers": ["fc6"]})
    assert from_dict(ModelConfig, to_dict(c)) == c
    assert c.init_bias_layers == ("fc6",)


def test_bad_precision_names_it():
    from splitnet.train.config import TrainConfig, load_config
    assert TrainConfig().precision == "fp32"  # the paper's arithmetic unless asked
    with pytest.raises(ConfigError, match="precision: 'fp8' is not one of fp32, fp32_cl, tf32, bf16, bf16_cl, fp16, fp16_cl, bf16_emu, bf16_emu_cl"):
        load_config(None, ['precision="fp8"'])


def test_set_item_reads_back_any_path_as_itself(tmp_path):
    """The one helper that writes a string for --set (reproduce, ablate, bench): a Windows path's
    backslashes, a quote, a tab or a DEL in a folder name come back unchanged, not as TOML escapes or
    as the quoted text itself."""
    from pathlib import Path

    from splitnet.config import set_item
    from splitnet.train.config import load_config
    for name in ("plain", r"C:\data\new", 'say "cheese"', "tab\tand\x7fdel", "café 漢字"):
        item = set_item("data.root", tmp_path / name)
        assert item.startswith('data.root="')
        assert Path(load_config(None, [item]).data.root).resolve() == (tmp_path / name).resolve(), item
    assert set_item("data.root", "/a/b") == 'data.root="/a/b"'  # an ordinary path as it was written by hand


def test_pct_is_the_reports_one_rule():
    from splitnet.formatting import pct
    assert (pct(0.3125), pct(None), pct(0.3125, 0.0051, unit=""), pct(0.3, 0.0, unit="")) == \
        ("31.2%", "-", "31.2 +/- 0.5", "30.0")
