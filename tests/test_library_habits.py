"""What a program that calls tunelab keeps as its own: its stdout, its logging setup, its warning filters.

The library logs to the `tunelab` logger (a NullHandler, nothing else); the CLI prints those records as the
lines it always printed. `quiet()` silences the libraries only around tunelab's own calls.
"""

from __future__ import annotations

import ast
import logging
import warnings
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import tunelab
from tests.helpers import QA_TRAIN, tiny_training
from tunelab.cli.app import app

SRC = Path(__file__).resolve().parent.parent / "src" / "tunelab"


def _sft(tiny_lm: Path, out: Path) -> dict:
    stage = {
        "stage": "sft",
        "model": str(tiny_lm),
        "data": QA_TRAIN,
        "lora": {"r": 4},
        "training": tiny_training(max_steps=1, disable_tqdm=True),
    }
    return {"output_dir": str(out), "seed": 0, "stages": {"s": stage}}


def _library_state() -> tuple:
    import datasets
    import transformers

    return (
        transformers.logging.get_verbosity(),
        transformers.utils.logging.is_progress_bar_enabled(),
        datasets.logging.get_verbosity(),
        datasets.are_progress_bars_disabled(),
        logging.getLogger("peft").level,
    )


def test_api_logs_instead_of_printing_and_leaves_the_callers_settings_alone(
    tmp_path: Path, tiny_lm: Path, capsys, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="tunelab")  # what a user turning the lines on does
    warnings.filterwarnings("always", category=FutureWarning)  # the caller's own filter, first in the list
    filters, library, root = list(warnings.filters), _library_state(), list(logging.getLogger().handlers)

    result = tunelab.run(tunelab.recipe_from_dict(_sft(tiny_lm, tmp_path / "run")))
    assert warnings.filters == filters and _library_state() == library
    assert logging.getLogger().handlers == root
    assert [type(h) for h in logging.getLogger("tunelab").handlers] == [logging.NullHandler]
    out = capsys.readouterr().out
    assert "-- s (sft)" not in out and "step 1/1" not in out, out  # logged, not printed
    assert any(m.startswith("-- s (sft) -> ") for m in caplog.messages), caplog.messages
    progress = [r for r in caplog.records if r.getMessage().startswith("step 1/1")]
    assert progress and progress[0].name == "tunelab.progress" and progress[0].levelno == logging.INFO

    tunelab.merge(result.outputs["s"], tmp_path / "merged")
    assert warnings.filters == filters and _library_state() == library


def test_cli_prints_the_logged_lines_and_leaves_the_logger_as_it_was(tmp_path: Path, tiny_lm: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_sft(tiny_lm, tmp_path / "run")))
    logger = logging.getLogger("tunelab")
    handlers, level = list(logger.handlers), logger.level
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("-- s (sft) -> ") for line in lines), result.output
    assert any(line.startswith("step 1/1  ") and " loss " in line for line in lines), result.output
    assert logger.handlers == handlers and logger.level == level


def test_quiet_is_only_entered_never_called_bare() -> None:
    """`quiet()` is a context manager: called bare, it does nothing at all (a silent no-op, not an error)."""
    bare = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        entered = {
            id(item.context_expr) for node in ast.walk(tree) if isinstance(node, ast.With) for item in node.items
        }
        entered |= {
            id(d)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for d in node.decorator_list
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "quiet" and id(node) not in entered:
                bare.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not bare, f"quiet() called outside `with`/a decorator: {bare}"


def _warn_from(module: str, category: type[Warning]) -> None:
    """A warning raised by code in `module` (what the filters' module field matches)."""
    exec(compile(f"import warnings\nwarnings.warn('old', {category.__name__})", module, "exec"), {"__name__": module})


def test_pytest_makes_tunelabs_deprecations_errors_and_shows_the_libraries() -> None:
    """pyproject's filterwarnings: tunelab's own (or a library's raised at tunelab's call) fail the test; a
    library's is a visible warning in the summary, as it is here, not an ignored one."""
    for category in (DeprecationWarning, FutureWarning):
        with pytest.raises(category):
            _warn_from("tunelab.pipeline", category)
        with warnings.catch_warnings(record=True) as seen:  # records under the filters as they are
            _warn_from("transformers.training_args", category)
        assert [w.category for w in seen] == [category]
