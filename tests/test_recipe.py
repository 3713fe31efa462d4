"""Recipe parsing, overrides and structural errors: no ML library needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab import TunelabError, load_recipe, recipe_from_dict
from tunelab.core.paths import shipped_recipes
from tunelab.recipe import apply_override

PIPELINE = {
    "output_dir": "runs/x",
    "stages": {
        "pretrain": {"stage": "pretrain", "training": {"max_steps": 10}},
        "sft": {"stage": "sft", "model": "${pretrain}", "training": {"max_steps": 20}, "lora": {"r": 8}},
    },
}


def test_single_stage_recipe_becomes_a_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("stage: sft\nmodel: some/model\ntraining:\n  learning_rate: 1.0e-4\n")
    recipe = load_recipe(path, ["training.learning_rate=3e-4", "lora.r=8"])
    assert list(recipe.stages) == ["sft"]
    assert recipe.stages["sft"]["training"]["learning_rate"] == "3e-4"  # typed later, against SFTConfig
    assert recipe.stages["sft"]["lora"] == {"r": 8}
    assert recipe.output_dir == Path("runs/r") and recipe.seed == 42


def test_overrides_address_stages_sections_and_top_level() -> None:
    recipe = recipe_from_dict(
        PIPELINE, ["sft.training.max_steps=5", "training.use_cpu=true", "seed=7", "output_dir=runs/y"]
    )
    assert recipe.stages["sft"]["training"] == {"max_steps": 5, "use_cpu": True}
    assert recipe.stages["pretrain"]["training"] == {"max_steps": 10, "use_cpu": True}
    assert recipe.seed == 7 and recipe.output_dir == Path("runs/y")
    lists = recipe_from_dict(PIPELINE, ["sft.lora.target_modules=[q_proj, v_proj]"])
    assert lists.stages["sft"]["lora"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_steps", "must look like key.path=value"),
        ("trainin.max_steps=3", "did you mean 'training'"),
        ("sft=3", "replaces a whole stage"),
        ("sft.lora.r.x=3", "'r' is 8, not a section"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(TunelabError, match=message):
        recipe_from_dict(PIPELINE, [override])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stages": {"a": {"stage": "sfft"}}}, "not a tunelab stage; did you mean 'sft'"),
        ({"stages": {"a": {"stage": "sft", "trainng": {}}}}, "unknown key 'stages.a.trainng'.*did you mean 'training'"),
        ({"stages": {"a": {"model": "x"}}}, "has no `stage:` key"),
        ({"stages": {}}, "non-empty mapping"),
        ({"stage": "sft", "seeed": 1}, "did you mean.*'seed'"),
        ({"stages": {"a": {"stage": "sft", "model": "${b}"}}}, "unknown stage 'b'"),
        ({"stages": {"a": {"stage": "sft", "model": "${b}"}, "b": {"stage": "sft", "model": "m"}}}, "runs later"),
        ({"stages": {"a": {"stage": "sft", "model": "${a}"}}}, "runs later"),
        ({"stages": {"a": {"stage": "sft", "model": "prefix-${a}"}}}, "must be the whole value"),
        ({"stage": "sft", "seed": "x"}, "'seed' must be an integer"),
    ],
)
def test_structural_errors(data: dict, message: str) -> None:
    with pytest.raises(TunelabError, match=message):
        recipe_from_dict(data)


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\ntraining:\n  learning_rate: [1\n")
    with pytest.raises(TunelabError, match=r"not valid YAML at line \d+, column \d+"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(TunelabError, match="must be a YAML mapping"):
        load_recipe(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(TunelabError, match="is empty"):
        load_recipe(empty)


def test_missing_recipe_suggests_shipped_name() -> None:
    with pytest.raises(TunelabError, match="did you mean 'quickstart'"):
        load_recipe("quickstrat")
    with pytest.raises(TunelabError, match="not found"):
        load_recipe("/no/such/recipe.yaml")


def test_every_shipped_recipe_parses() -> None:
    names = shipped_recipes()
    assert "quickstart" in names
    for name in names:
        assert load_recipe(name).stages


def test_apply_override_creates_sections() -> None:
    data = {"stage": "sft"}
    apply_override(data, "lora.r=4")
    assert data == {"stage": "sft", "lora": {"r": 4}}


# Recipes written for a GPU machine name hub models: offline they are checked up to the download.
NEEDS_DOWNLOADS = {
    "diffusion/lora-sd": ["stages.lora.model"],
    "rlhf/qwen": ["stages.sft.model", "stages.reward.data", "stages.ppo.data", "stages.dpo.data", "stages.rloo.data"],
    "sft/lora-qwen": ["stages.sft.model"],
    "sft/qlora-qwen": ["stages.sft.model"],
    "vlm/smolvlm-gpu": ["stages.vlm_sft.model", "stages.eval.models.before"],
}


# Recipes that start from another recipe's run (`make sft` runs the quickstart first): a tiny causal LM
# stands in for runs/quickstart/pretrain, which a fresh clone does not have.
STARTS_FROM_A_RUN = {"sft/lora-arith": "model", "sft/qlora-arith": "model"}


# Validating these reads every stage's data through SmolLM2's chat template (17-40 s each): rlhf/arith in the
# default suite checks the same stage kinds, `make mixture` validates its own recipe, and the slow
# test_real_model_track_shrunk runs real/smollm2-arith end to end.
SLOW_TO_VALIDATE = {"real/smollm2-mixture", "real/smollm2-arith"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_VALIDATE else n for n in sorted(shipped_recipes())],
)
def test_every_shipped_recipe_validates_against_the_installed_libraries(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Every stage of every shipped recipe, GPU ones included, through the checks `tunelab validate` runs,
    against the installed library versions (a field a new transformers drops fails here), on an empty
    GGUF cache (a machine that never ran tunelab). Stages whose hub model or data cannot be downloaded
    here are checked up to that point, and so are the stages after them."""
    from tunelab.pipeline import check_offline

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    overrides = [f"output_dir={tmp_path / 'run'}"]
    if name in STARTS_FROM_A_RUN:
        overrides.append(f"{STARTS_FROM_A_RUN[name]}={request.getfixturevalue('tiny_lm')}")
    recipe = load_recipe(name, overrides)
    downloads = check_offline(recipe)
    assert [line.split("'")[1] for line in downloads] == NEEDS_DOWNLOADS.get(name, []), downloads
    assert all("unreachable" in line for line in downloads)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
