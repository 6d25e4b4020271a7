import json
from dataclasses import dataclass, field
from typing import Optional

import pytest

from nanofm.common import ConfigError
from nanofm.config import config_to_dict, parse_config


@dataclass
class DemoConfig:
    vocab_size: int = 8192  # size of the vocabulary
    lr: float = 3e-4  # peak learning rate
    name: str = "default"  # run name
    force: bool = False  # rebuild finished steps
    input: list[str] = field(default_factory=list)  # input paths, repeatable
    seed: Optional[int] = None  # random seed, none for random

    def __post_init__(self):
        if self.vocab_size < 256:
            raise ValueError(f"vocab_size must be at least 256, got {self.vocab_size}")


def test_defaults_and_both_flag_styles():
    cfg = parse_config(DemoConfig, [])
    assert cfg == DemoConfig()
    cfg = parse_config(DemoConfig, ["--vocab_size=4096", "--lr", "0.01", "--name", "x"])
    assert (cfg.vocab_size, cfg.lr, cfg.name) == (4096, 0.01, "x")


def test_bool_list_optional():
    cfg = parse_config(DemoConfig, ["--force", "--input", "a", "--input=b", "--seed=7"])
    assert cfg.force is True and cfg.input == ["a", "b"] and cfg.seed == 7
    assert parse_config(DemoConfig, ["--force=false"]).force is False
    assert parse_config(DemoConfig, ["--seed=none"]).seed is None


def test_unknown_flag_names_closest():
    with pytest.raises(ConfigError, match="unknown flag --vocab-size; did you mean --vocab_size"):
        parse_config(DemoConfig, ["--vocab-size=10"])


def test_abbreviation_is_refused():
    with pytest.raises(ConfigError, match="--vocab_size"):
        parse_config(DemoConfig, ["--vocab=10"])


def test_bad_value_and_validation():
    with pytest.raises(ConfigError, match="expected int"):
        parse_config(DemoConfig, ["--vocab_size=abc"])
    with pytest.raises(ConfigError, match="at least 256"):
        parse_config(DemoConfig, ["--vocab_size=10"])


def test_config_file_then_flags_override(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"vocab_size": 1000, "lr": 1, "input": ["p"]}))
    cfg = parse_config(DemoConfig, [f"--config={path}", "--vocab_size=2000"])
    assert cfg.vocab_size == 2000 and cfg.lr == 1.0 and cfg.input == ["p"]
    path.write_text(json.dumps({"vocab_sise": 1000}))
    with pytest.raises(ConfigError, match="vocab_size"):
        parse_config(DemoConfig, [f"--config={path}"])
    path.write_text(json.dumps({"vocab_size": "big"}))
    with pytest.raises(ConfigError, match="must be int"):
        parse_config(DemoConfig, [f"--config={path}"])


def test_round_trip_through_saved_dict(tmp_path):
    cfg = parse_config(DemoConfig, ["--lr=0.5", "--input=a"])
    saved = tmp_path / "cfg.json"
    saved.write_text(json.dumps(config_to_dict(cfg)))
    assert parse_config(DemoConfig, [f"--config={saved}"]) == cfg


def test_help_shows_field_comments(capsys):
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--help"])
    assert "peak learning rate" in capsys.readouterr().out
