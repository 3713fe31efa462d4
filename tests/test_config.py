"""Recipe values checked and converted against the libraries' own field annotations."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from trl import SFTConfig

from tunelab.core.config import build, check_keys, coerce
from tunelab.core.errors import TunelabError


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        ("1e-4", float, 1e-4),  # YAML 1.1 reads 1e-4 as a string
        (3, float, 3.0),
        ("12", int, 12),
        (4.0, int, 4),
        (None, int | None, None),
        ("x", int | str, "x"),
        (5, int | str, 5),
        (["q_proj"], list[str] | str | None, ["q_proj"]),
        ("all-linear", list[str] | str | None, "all-linear"),
    ],
)
def test_coerce_accepts(value, tp, expected) -> None:
    assert coerce(value, tp, "x") == expected


@pytest.mark.parametrize(
    ("value", "tp"), [("fast", float), (True, int), (1.5, int), ("yes", bool), (3, str), ([1, "a"], list[int])]
)
def test_coerce_rejects(value, tp) -> None:
    with pytest.raises(TunelabError, match="'x' is"):
        coerce(value, tp, "x")


def test_yaml_no_means_the_string_no_for_strategies() -> None:
    args = build(
        SFTConfig,
        {"save_strategy": False, "eval_strategy": False, "use_cpu": True, "bf16": False},
        "training",
        fixed={"output_dir": "/tmp/tunelab-test"},
    )
    assert args.save_strategy == "no" and args.eval_strategy == "no"


def test_lora_config_is_built_by_peft() -> None:
    config = build(LoraConfig, {"r": "8", "lora_alpha": 16, "target_modules": ["q_proj"]}, "lora")
    assert isinstance(config, LoraConfig) and config.r == 8 and config.target_modules == {"q_proj"}
    with pytest.raises(TunelabError, match="did you mean 'lora_alpha'"):
        check_keys({"lora_alfa": 2}, LoraConfig, "lora")
