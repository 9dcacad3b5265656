"""The run configuration: defaults, layering, --set parsing, validation messages and YAML."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer_core.config import (
    ATTENTION_CHOICES,
    Config,
    ConfigError,
    DataConfig,
    OptimizationsConfig,
    OptimizerConfig,
    TrainerConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    dump_yaml,
    load_config,
    parse_override,
)

DOCUMENTED_DEFAULTS = {
    "trainer": {
        "iterations": 1000, "save_frequency": 0, "eval_frequency": 0, "keep_last": 3, "save_on_quit": True,
        "export_on_save": False, "export_on_quit": False, "seed": 0, "device": "auto", "dtype": "float32",
        "grad_accumulation": 1, "grad_clip": 0.0, "grad_norm_every": 50, "detect_anomaly": False,
        "nonfinite_patience": 10,
        "weights_format": "safetensors", "log_every": 10, "status_every_s": 1.0, "tensorboard": False,
        "deterministic": True,
    },
    "data": {
        "batch_size": 16, "max_tokens": 0, "sampler": "auto", "num_workers": 0, "prefetch_factor": 2,
        "shuffle": True, "drop_last": True,
    },
    "optimizer": {
        "name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "momentum": 0.9, "eps": 1e-8,
        "warmup_steps": 0, "schedule": "constant", "min_lr_ratio": 0.0,
    },
    "optimizations": {
        "activation_offload": False, "unsloth": False, "offload_blocks": "", "linear": "", "embedding": "",
        "attention": "", "compile": False, "compile_backend": "auto", "measure_activations": False,
    },
    "recipe": {},
}


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ defaults and layers

def test_defaults_are_the_documented_ones() -> None:
    assert config_to_dict(Config()) == DOCUMENTED_DEFAULTS
    assert load_config() == Config()


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer:\n  iterations: 300\n  seed: 7\n")
    defaults = {"trainer": {"iterations": 200, "seed": 5, "keep_last": 9}}
    cfg = load_config(path, ["trainer.iterations=400"], defaults=defaults)
    assert (cfg.trainer.iterations, cfg.trainer.seed, cfg.trainer.keep_last) == (400, 7, 9)
    assert cfg.trainer.log_every == 10, "keys no layer sets keep the dataclass default"
    assert load_config(None, (), defaults).trainer.iterations == 200
    assert load_config(path, (), defaults).trainer.iterations == 300


def test_recipe_mappings_merge_deeply_across_layers(tmp_path: Path) -> None:
    defaults = {"recipe": {"model": {"dim": 16, "depth": 2}, "data": "tiny"}}
    path = write(tmp_path, "recipe:\n  model:\n    dim: 32\n")
    cfg = load_config(path, ["recipe.model.heads=4", "recipe.extra.deep.key=x"], defaults=defaults)
    assert cfg.recipe == {"model": {"dim": 32, "depth": 2, "heads": 4}, "data": "tiny",
                          "extra": {"deep": {"key": "x"}}}


def test_later_overrides_win_and_a_mapping_may_replace_a_recipe_scalar() -> None:
    cfg = load_config(None, ["trainer.seed=1", "trainer.seed=2", "recipe.a=1", "recipe.a.b=2"])
    assert cfg.trainer.seed == 2
    assert cfg.recipe == {"a": {"b": 2}}


def test_a_layer_does_not_share_mutable_values_with_the_result() -> None:
    defaults = {"optimizer": {"betas": [0.8, 0.9]}, "recipe": {"sizes": [1, 2]}}
    cfg = load_config(None, (), defaults)
    cfg.optimizer.betas.append(0.1)
    cfg.recipe["sizes"].append(3)
    assert defaults == {"optimizer": {"betas": [0.8, 0.9]}, "recipe": {"sizes": [1, 2]}}


def test_unsloth_is_an_alias_that_turns_on_activation_offload() -> None:
    cfg = load_config(None, ["optimizations.unsloth=true"])
    assert cfg.optimizations.activation_offload and cfg.optimizations.unsloth
    assert not load_config().optimizations.activation_offload


# ------------------------------------------------------------------------------ --set and YAML scalars

@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("trainer.iterations=200", {"trainer": {"iterations": 200}}),
        ("optimizer.lr=1e-4", {"optimizer": {"lr": 1e-4}}),
        ("optimizer.betas=[0.9,0.95]", {"optimizer": {"betas": [0.9, 0.95]}}),
        ("recipe.dim=64", {"recipe": {"dim": 64}}),
        ("recipe.model.act=gelu", {"recipe": {"model": {"act": "gelu"}}}),
        ("recipe.name=a=b", {"recipe": {"name": "a=b"}}),
        ("optimizations.linear=", {"optimizations": {"linear": ""}}),
        (" trainer.device = cuda:1", {"trainer": {"device": "cuda:1"}}),
        ("recipe.flag=yes", {"recipe": {"flag": "yes"}}),
        ("recipe.flag=true", {"recipe": {"flag": True}}),
        ("recipe.none=null", {"recipe": {"none": None}}),
        ("recipe.hex=0x10", {"recipe": {"hex": 16}}),
        ("recipe.leading=017", {"recipe": {"leading": 17}}),
        ("recipe.day=2024-01-01", {"recipe": {"day": "2024-01-01"}}),
        ("recipe.map={a: 1}", {"recipe": {"map": {"a": 1}}}),
    ],
)
def test_set_values_are_read_as_yaml_1_2_scalars_and_lists(item: str, expected: dict) -> None:
    assert parse_override(item) == expected


def test_yaml_files_read_exponents_as_numbers_and_yes_as_text(tmp_path: Path) -> None:
    path = write(tmp_path, "optimizer:\n  lr: 1e-4\n  eps: 1.0e-10\nrecipe:\n  on: off\n  when: 2024-05-01\n")
    cfg = load_config(path)
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.eps == 1e-10
    assert cfg.recipe == {"on": "off", "when": "2024-05-01"}


def test_an_integer_is_accepted_where_a_number_is_expected() -> None:
    cfg = load_config(None, ["optimizer.lr=1", "trainer.grad_clip=2"])
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert isinstance(cfg.trainer.grad_clip, float)


def test_empty_files_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing yet\n")) == Config()
    assert load_config(write(tmp_path, "trainer:\ndata:\nrecipe:\n", "b.yaml")) == Config()


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    path = write(tmp_path, "recipe:\n  base: &b {dim: 8, depth: 2}\n  big:\n    <<: *b\n    dim: 64\n")
    assert load_config(path).recipe["big"] == {"dim": 64, "depth": 2}


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize(
    ("overrides", "message", "key"),
    [
        (["trainer.iterations=ten"], "trainer.iterations: expected an integer, got 'ten'", "trainer.iterations"),
        (["trainer.iterations=true"], "trainer.iterations: expected an integer, got true (a boolean)",
         "trainer.iterations"),
        (["trainer.iterations=1.5"], "trainer.iterations: expected an integer, got 1.5", "trainer.iterations"),
        (["trainer.iterations=-1"], "trainer.iterations: expected an integer >= 0, got -1", "trainer.iterations"),
        (["trainer.grad_accumulation=0"], "trainer.grad_accumulation: expected an integer >= 1, got 0",
         "trainer.grad_accumulation"),
        (["trainer.save_on_quit=1"], "trainer.save_on_quit: expected true or false, got 1", "trainer.save_on_quit"),
        (["trainer.save_on_quit=yes"], "trainer.save_on_quit: expected true or false, got 'yes'",
         "trainer.save_on_quit"),
        (["trainer.device=gpu"], "trainer.device: expected auto, cpu, cuda, cuda:N or mps; got 'gpu'",
         "trainer.device"),
        (["trainer.device=cuda:x"], "trainer.device: expected auto, cpu, cuda, cuda:N or mps; got 'cuda:x'",
         "trainer.device"),
        (["trainer.dtype=fp16"], "trainer.dtype: expected one of float32, bfloat16, float16; got 'fp16'",
         "trainer.dtype"),
        (["trainer.weights_format=ckpt"], "trainer.weights_format: expected one of safetensors, pt; got 'ckpt'",
         "trainer.weights_format"),
        (["trainer.status_every_s=0"], "trainer.status_every_s: expected a number > 0, got 0.0",
         "trainer.status_every_s"),
        (["trainer.grad_clip=.nan"], "trainer.grad_clip: expected a finite number, got nan", "trainer.grad_clip"),
        (["data.sampler=randm"], "data.sampler: expected one of auto, random, ordered, batched; got 'randm' "
                                 "(did you mean 'random'?)", "data.sampler"),
        (["data.batch_size=0"], "data.batch_size: expected an integer >= 1, got 0", "data.batch_size"),
        (["optimizer.name=adam_w"], "optimizer.name: expected one of adamw, adam, sgd; got 'adam_w' "
                                    "(did you mean 'adamw'?)", "optimizer.name"),
        (["optimizer.schedule=cos"], "optimizer.schedule: expected one of constant, cosine, linear; got 'cos'",
         "optimizer.schedule"),
        (["optimizer.lr=0"], "optimizer.lr: expected a number > 0, got 0.0", "optimizer.lr"),
        (["optimizer.lr=-1e-3"], "optimizer.lr: expected a number > 0, got -0.001", "optimizer.lr"),
        (["optimizer.lr=fast"], "optimizer.lr: expected a number, got 'fast'", "optimizer.lr"),
        (["optimizer.betas=0.9"], "optimizer.betas: expected a list of numbers, got 0.9", "optimizer.betas"),
        (["optimizer.betas=[0.9]"], "optimizer.betas: expected 2 numbers, got 1: [0.9]", "optimizer.betas"),
        (["optimizer.betas=[0.9,1]"], "optimizer.betas[1]: expected a number < 1, got 1.0", "optimizer.betas[1]"),
        (["optimizer.betas=[0.9,x]"], "optimizer.betas[1]: expected a number, got 'x'", "optimizer.betas[1]"),
        (["optimizer.min_lr_ratio=2"], "optimizer.min_lr_ratio: expected a number <= 1, got 2.0",
         "optimizer.min_lr_ratio"),
        (["optimizations.attention=flash"], "optimizations.attention: expected one of '', sdpa, sdpa:flash, "
                                            "sdpa:efficient, sdpa:cudnn, sdpa:math, math; got 'flash' "
                                            "(did you mean 'sdpa:flash'?)",
         "optimizations.attention"),
        (["optimizations.compile_backend="], "optimizations.compile_backend: expected a name; got ''",
         "optimizations.compile_backend"),
        (["optimizations.linear=5"], "optimizations.linear: expected a string, got 5", "optimizations.linear"),
        (["trainer.iteratons=5"], "unknown key 'trainer.iteratons'; did you mean 'trainer.iterations'?",
         "trainer.iteratons"),
        (["trainer.lr=0.1"], "unknown key 'trainer.lr'; did you mean 'optimizer.lr'?", "trainer.lr"),
        (["trainer.zzz=1"], "unknown key 'trainer.zzz'", "trainer.zzz"),
        (["iterations=5"], "unknown section 'iterations'; did you mean 'trainer.iterations'?", "iterations"),
        (["trainr.seed=5"], "unknown section 'trainr'; did you mean 'trainer'?", "trainr"),
        (["zzz.a=5"], "unknown section 'zzz' (sections: trainer, data, optimizer, optimizations, recipe)", "zzz"),
        (["trainer=5"], "trainer: expected a mapping of settings, got 5", "trainer"),
        (["recipe=5"], "recipe: expected a mapping, got 5", "recipe"),
        (["trainer.iterations.x=5"], "trainer.iterations: expected an integer, got a mapping {'x': 5}",
         "trainer.iterations"),
        (["trainer.iterations"], "--set 'trainer.iterations': expected KEY=VALUE, e.g. --set trainer.iterations=200",
         None),
        (["=5"], "--set '=5': the key before '=' is empty", None),
        (["trainer..seed=5"], "--set 'trainer..seed=5': the key 'trainer..seed' has an empty part", "trainer..seed"),
        (["recipe.x=[1"], "--set 'recipe.x=[1': the value is not valid YAML (expected ',' or ']'", "recipe.x"),
    ],
)
def test_every_bad_value_names_its_key_path_and_what_was_expected(overrides: list[str], message: str,
                                                                  key: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value).startswith(message)
    assert info.value.key == key


def test_errors_say_which_layer_the_bad_value_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer:\n  iterations: ten\n")
    with pytest.raises(ConfigError, match=rf"trainer.iterations: expected an integer, got 'ten' \(in {path}\)$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"got 'ten' \(in --set trainer.iterations=ten\)$"):
        load_config(None, ["trainer.iterations=ten"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.batchsize'.* \(in the recipe's defaults\)$"):
        load_config(None, (), defaults={"data": {"batchsize": 3}})


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_a_directory_or_binary_file_cannot_be_read_as_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"cannot read config file {tmp_path}"):
        load_config(tmp_path)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match=r"cannot read config file .*weights\.bin"):
        load_config(binary)


def test_invalid_yaml_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer:\n  iterations: 5\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path} is not valid YAML: .* at line 4, column 1"):
        load_config(path)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n", "42\n"])
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"expected a mapping of sections \(trainer, data, optimizer, "
                                          rf"optimizations, recipe\), got .* \(in {path}\)"):
        load_config(path)


def test_overrides_given_as_one_string_are_refused() -> None:
    with pytest.raises(ConfigError, match="overrides must be a list of KEY=VALUE strings"):
        load_config(None, "trainer.seed=1")


def test_recipe_keys_must_be_strings_and_values_plain(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"recipe\.model: keys must be strings, got 1") as info:
        load_config(write(tmp_path, "recipe:\n  model:\n    1: a\n"))
    assert info.value.key == "recipe.model"
    with pytest.raises(ConfigError, match=r"recipe.sizes\[1\]: expected a plain value .* got a set"):
        config_from_dict({"recipe": {"sizes": [1, {2}]}})


def test_attention_choices_are_the_kernels_the_trainer_knows() -> None:
    from trainer_core.attention import KNOWN_ATTENTION

    assert set(ATTENTION_CHOICES) == {"", *KNOWN_ATTENTION}


def test_sections_built_directly_are_validated_with_their_key_path() -> None:
    with pytest.raises(ConfigError, match=r"^trainer.iterations: expected an integer >= 0, got -1$"):
        TrainerConfig(iterations=-1)
    with pytest.raises(ConfigError, match=r"^data.num_workers: expected an integer, got '2'$"):
        DataConfig(num_workers="2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^optimizer.eps: expected a number > 0"):
        dataclasses.replace(OptimizerConfig(), eps=0)
    with pytest.raises(ConfigError, match=r"^optimizations: expected OptimizationsConfig, got dict$"):
        Config(optimizations={})  # type: ignore[arg-type]
    assert OptimizationsConfig(attention="sdpa:flash").attention == "sdpa:flash"


# ------------------------------------------------------------------------------ dicts and YAML round trips

def test_config_to_dict_is_json_and_config_from_dict_inverts_it() -> None:
    cfg = load_config(None, ["trainer.iterations=5", "recipe.layers=[1,2]"])
    as_dict = config_to_dict(cfg)
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert config_from_dict(as_dict) == cfg
    assert config_from_dict({"trainer": {"seed": 4}}) == load_config(None, ["trainer.seed=4"])


def test_dump_yaml_writes_atomically_and_loads_back_equal(tmp_path: Path) -> None:
    cfg = load_config(None, ["optimizer.lr=3e-4", "recipe.note=1e-4", "recipe.flag=yes"])
    target = tmp_path / "config.yaml"
    target.write_text("old contents that must be replaced\n")
    assert dump_yaml(cfg, target) == target
    assert load_config(target) == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"], "no temporary file is left behind"
    assert target.read_text() == config_to_yaml(cfg)


def test_dump_yaml_into_a_missing_folder_fails_without_leaving_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        dump_yaml(Config(), tmp_path / "nope" / "config.yaml")
    assert list(tmp_path.iterdir()) == []


def test_strings_that_look_like_other_types_survive_the_yaml_round_trip(tmp_path: Path) -> None:
    tricky = ["1e-4", "yes", "no", "on", "null", "~", "", "true", "0x10", "017", "2024-01-01", "1:30", ".inf", "a\x85b",
              "- x", "a: b", "#hash", "'quoted'", "multi\nline", "  padded  "]
    cfg = config_from_dict({"recipe": {"strings": tricky}})
    assert load_config(dump_yaml(cfg, tmp_path / "c.yaml")).recipe["strings"] == tricky


plain_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=12)
                 | st.floats(allow_nan=False))
recipe_values = st.recursive(
    plain_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3),
    max_leaves=12,
)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    trainer = TrainerConfig(
        iterations=draw(st.integers(0, 10**9)),
        keep_last=draw(st.integers(0, 50)),
        device=draw(st.sampled_from(["auto", "cpu", "cuda", "cuda:3", "mps"])),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
        grad_clip=draw(st.floats(0, 1e6)),
        status_every_s=draw(st.floats(1e-6, 1e6)),
        save_on_quit=draw(st.booleans()),
    )
    data = DataConfig(batch_size=draw(st.integers(1, 4096)), sampler=draw(st.sampled_from(["auto", "batched"])))
    optimizer = OptimizerConfig(
        lr=draw(st.floats(1e-12, 10.0)),
        betas=draw(st.lists(st.floats(0, 0.999999), min_size=2, max_size=2)),
        schedule=draw(st.sampled_from(["constant", "cosine", "linear"])),
    )
    optimizations = OptimizationsConfig(offload_blocks=draw(st.text(max_size=20)), unsloth=draw(st.booleans()))
    recipe = draw(st.dictionaries(st.text(min_size=1, max_size=8), recipe_values, max_size=4))
    return Config(trainer, data, optimizer, optimizations, recipe)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs())
def test_load_of_dump_gives_back_the_same_config(tmp_path: Path, cfg: Config) -> None:
    assert load_config(dump_yaml(cfg, tmp_path / "round.yaml")) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
