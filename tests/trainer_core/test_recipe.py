"""Loading recipes by name, module path and file path, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer_core.loop_helpers import train
from trainer_core.recipe import RecipeError, load_recipe, recipe_defaults, resolve_config

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "sine_recipe.py")


def test_builtin_demo_is_found_by_name() -> None:
    assert load_recipe("demo").__module__ == "trainer_core.recipes.demo"


def test_module_path_with_function_is_loaded() -> None:
    assert load_recipe("trainer_core.recipes.demo:build") is load_recipe("demo")


def test_user_recipe_from_a_file_path_trains_and_evaluates(tmp_path: Path) -> None:
    config = resolve_config(f"{EXAMPLE}:build", None, ["trainer.iterations=40", "trainer.eval_frequency=20",
                                                       "trainer.log_every=0"])
    code, channel = train(tmp_path, config, recipe=f"{EXAMPLE}:build")
    assert code == 0
    evals = [m["values"]["eval/mse"] for m in channel.of_type("metrics") if "eval/mse" in m["values"]]
    assert len(evals) == 2 and evals[1] < evals[0]


def test_recipe_defaults_sit_below_overrides() -> None:
    assert recipe_defaults(f"{EXAMPLE}:build")["data"]["batch_size"] == 64
    config = resolve_config(f"{EXAMPLE}:build", None, ["data.batch_size=8"])
    assert config.data.batch_size == 8
    assert config.optimizer.lr == pytest.approx(1e-2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:build", "cannot import"),
        ("missing/file.py:build", "not found"),
        ("trainer_core.recipes.demo:nope", "no function 'nope'"),
    ],
)
def test_bad_recipe_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(spec)


def test_a_recipe_returning_the_wrong_type_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad_recipe.py"
    bad.write_text("def build(config):\n    return 42\n")
    from trainer_core.recipe import build_recipe

    with pytest.raises(RecipeError, match="returned int"):
        build_recipe(f"{bad}:build", resolve_config(f"{bad}:build", None, []))
