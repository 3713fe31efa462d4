"""`tunelab attention`: real attention weights, drawn as a PNG grid; bad indices fail in one line."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from tunelab.cli.app import app
from tunelab.models.attention import attention_maps


def test_attention_weights_are_causal_distributions(tiny_lm: Path) -> None:
    tokens, maps = attention_maps(str(tiny_lm), "Mia has 7 pears.")
    assert len(maps) == 2 and maps[0].shape == (4, len(tokens), len(tokens))
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(4, len(tokens)))  # each row is a distribution
    assert torch.all(maps[1].triu(diagonal=1) == 0)  # a causal LM never attends ahead


def test_attention_command_writes_png_and_checks_indices(tmp_path: Path, tiny_lm: Path) -> None:
    out = tmp_path / "att.png"
    ok = CliRunner().invoke(
        app, ["attention", str(tiny_lm), "Mia has 7 pears.", "--layers", "0,-1", "--heads", "1", "--out", str(out)]
    )
    assert ok.exit_code == 0, ok.output
    assert out.read_bytes().startswith(b"\x89PNG")
    bad = CliRunner().invoke(app, ["attention", str(tiny_lm), "x", "--layers", "7"])
    assert bad.exit_code == 2 and "layers [7] out of range: the model has 2" in bad.output
