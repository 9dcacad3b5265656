"""The config files' YAML dialect: 1.2 core scalars in, text any YAML reader reads the same out."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_core import config_yaml


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e-4", 1e-4),
        ("-2E+3", -2000.0),
        (".5", 0.5),
        ("1.", 1.0),
        (".inf", float("inf")),
        ("-.Inf", float("-inf")),
        ("12", 12),
        ("-7", -7),
        ("+7", 7),
        ("017", 17),
        ("0o17", 15),
        ("0x1F", 31),
        ("true", True),
        ("False", False),
        ("null", None),
        ("~", None),
        ("yes", "yes"),
        ("off", "off"),
        ("2024-01-01", "2024-01-01"),
        ("1:30", "1:30"),
        ("0b101", "0b101"),
        ("1_000", "1_000"),
        ("cuda:0", "cuda:0"),
        ("nullable", "nullable"),
        ("truest", "truest"),
    ],
)
def test_scalars_follow_yaml_1_2_core_rules(text: str, expected: object) -> None:
    assert config_yaml.load(f"key: {text}\n") == {"key": expected}


def test_nan_reads_as_a_float_nan() -> None:
    value = config_yaml.load("key: .nan\n")["key"]
    assert isinstance(value, float) and value != value


def test_an_empty_document_is_none_and_merge_keys_still_work() -> None:
    assert config_yaml.load("# only a comment\n") is None
    assert config_yaml.load("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  q: 3\n")["b"] == {"p": 1, "q": 3}


def test_problems_name_the_line_and_column() -> None:
    with pytest.raises(yaml.YAMLError) as info:
        config_yaml.load("a: 1\nb: [2, 3\n")
    assert config_yaml.problem(info.value) == "expected ',' or ']', but got '<stream end>' at line 3, column 1"


def test_dump_keeps_key_order_and_writes_block_style() -> None:
    assert config_yaml.dump({"z": 1, "a": {"list": [1, 2]}}) == "z: 1\na:\n  list:\n  - 1\n  - 2\n"


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=15,
)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_like, max_size=4))
def test_dumped_text_reads_back_the_same_here_and_with_plain_safe_load(data: dict) -> None:
    text = config_yaml.dump(data)
    assert config_yaml.load(text) == data
    assert yaml.safe_load(text) == data
