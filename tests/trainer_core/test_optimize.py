"""The optimizations section: good options apply and report, bad ones name the problem."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer_core.attention import SDPAMultiheadAttention
from trainer_core.offload import is_offloaded
from trainer_core.optimize import (
    KNOWN_ATTENTION,
    KNOWN_EMBEDDING,
    KNOWN_LINEAR,
    OPTION_DEFAULTS,
    apply_optimizations,
    validate_options,
)
from trainer_core.wrapper import ComputeDtypeLinear


class Layer(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 17, dim: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), tokens.flatten())


def tiny() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


TOKENS = torch.randint(0, 17, (2, 6), generator=torch.Generator().manual_seed(3))


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    model(TOKENS).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_the_options_and_their_defaults_are_the_config_sections_fields() -> None:
    assert OPTION_DEFAULTS == {
        "activation_offload": False, "unsloth": False, "offload_blocks": "", "linear": "", "embedding": "",
        "attention": "", "compile": False, "compile_backend": "auto", "measure_activations": False,
    }
    assert "bf16" in KNOWN_LINEAR and "sparse" in KNOWN_EMBEDDING and "sdpa:flash" in KNOWN_ATTENTION


def test_default_options_change_nothing() -> None:
    model, plain = tiny(), tiny()
    assert apply_optimizations(model, {}) == []
    assert apply_optimizations(model, dict(OPTION_DEFAULTS)) == []
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    assert not any(is_offloaded(m) for m in model.modules())


@pytest.mark.parametrize("key", ["activation_offload", "unsloth"])
def test_activation_offload_and_its_unsloth_alias_wrap_the_layers_and_keep_gradients(key: str) -> None:
    model, plain = tiny(), tiny()
    lines = apply_optimizations(model, {key: True})
    assert lines == ["activation offload: 3 blocks (layers.0, layers.1, layers.2) recompute from a CPU copy "
                     "of their input"]
    expected, got = gradients(plain), gradients(model)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_offload_blocks_take_class_names_or_a_name_pattern() -> None:
    by_class = tiny()
    apply_optimizations(by_class, {"activation_offload": True, "offload_blocks": "Layer"})
    assert [is_offloaded(layer) for layer in by_class.layers] == [True] * 3
    by_pattern = tiny()
    lines = apply_optimizations(by_pattern, {"unsloth": True, "offload_blocks": r"layers\.[02]"})
    assert [is_offloaded(layer) for layer in by_pattern.layers] == [True, False, True]
    assert "2 blocks (layers.0, layers.2)" in lines[0]
    several = tiny()
    apply_optimizations(several, {"unsloth": True, "offload_blocks": "LayerNorm, GELU"})
    assert is_offloaded(several.layers[1].norm) and is_offloaded(several.layers[1].mlp[1])


def test_offload_blocks_without_offload_are_reported_as_ignored() -> None:
    model = tiny()
    lines = apply_optimizations(model, {"offload_blocks": "Layer"})
    assert lines == ["offload_blocks ignored: activation_offload is off"]
    assert not is_offloaded(model.layers[0])


def test_swaps_apply_together_and_say_what_they_did() -> None:
    model, plain = tiny(), tiny()
    lines = apply_optimizations(model, {"linear": "bf16", "embedding": "embedding", "attention": "math",
                                        "activation_offload": True, "measure_activations": True})
    assert lines == [
        "linear: 7 nn.Linear -> bf16",
        "embedding: 1 nn.Embedding -> embedding",
        "attention: 3 modules -> math",
        "activation offload: 3 blocks (layers.0, layers.1, layers.2) recompute from a CPU copy of their input",
        "measure_activations: logging train/activation_bytes and train/activation_cpu_bytes",
    ]
    assert type(model.head) is ComputeDtypeLinear and isinstance(model.layers[0].attn, SDPAMultiheadAttention)
    assert list(model.state_dict()) == list(plain.state_dict())
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(model(TOKENS), plain(TOKENS), atol=0.05)


def test_compile_with_an_explicit_backend_compiles_in_place() -> None:
    model = tiny()
    assert apply_optimizations(model, {"compile": True, "compile_backend": "eager"}) == ["compile: backend eager"]
    assert model._compiled_call_impl is not None


@pytest.mark.parametrize(("options", "message"), [
    ({"activation_ofload": True}, r"unknown option 'activation_ofload' \(did you mean 'activation_offload'\?\)"),
    ({"turbo": 1}, r"unknown option 'turbo'; known: activation_offload, unsloth"),
    ({"activation_offload": "yes"}, r"optimizations.activation_offload: expected bool, got 'yes'"),
    ({"compile": 1}, r"optimizations.compile: expected bool, got 1"),
    ({"linear": True}, r"optimizations.linear: expected str, got True"),
    ({"linear": "int4"}, r"optimizations.linear: unknown name 'int4'; known: linear, bf16, fp16"),
    ({"embedding": "bf16"}, r"optimizations.embedding: unknown name 'bf16'; known: embedding, sparse"),
    ({"attention": "flash"}, r"optimizations.attention: unknown name 'flash'; known: sdpa, sdpa:flash"),
    ({"offload_blocks": "layers[0"}, r"offload_blocks: 'layers\[0' is neither class names nor a valid regular"),
    ({"compile_backend": "inductr"}, r"optimizations.compile_backend: unknown name 'inductr'; known: auto,"),
])
def test_bad_options_are_refused_naming_the_key_before_touching_the_model(
    options: dict[str, Any], message: str
) -> None:
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        apply_optimizations(model, options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == [type(m) for m in tiny().modules()]


def test_offload_blocks_naming_a_missing_class_or_matching_nothing_are_refused() -> None:
    with pytest.raises(ValueError, match=r"no module of class 'Block' in TinyLM \(classes: .*Layer.*pattern"):
        apply_optimizations(tiny(), {"activation_offload": True, "offload_blocks": "Layer, Block"})
    with pytest.raises(ValueError, match=r"offload_blocks: 'encoder\.\*' matched no module"):
        apply_optimizations(tiny(), {"activation_offload": True, "offload_blocks": "encoder.*"})


def test_offload_on_a_model_without_repeated_blocks_is_refused_with_the_way_out() -> None:
    with pytest.raises(ValueError, match=r"Sequential has no repeated blocks .* set offload_blocks"):
        apply_optimizations(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), {"activation_offload": True})


@settings(max_examples=15, deadline=None)
@given(offload=st.booleans(), unsloth=st.booleans(), linear=st.sampled_from(("", *KNOWN_LINEAR)),
       embedding=st.sampled_from(("", *KNOWN_EMBEDDING)),
       attention=st.sampled_from(("", "sdpa", "sdpa:math", "math")), measure=st.booleans())
def test_any_valid_combination_applies_and_reports_one_line_per_option(
    offload: bool, unsloth: bool, linear: str, embedding: str, attention: str, measure: bool
) -> None:
    options = {"activation_offload": offload, "unsloth": unsloth, "linear": linear, "embedding": embedding,
               "attention": attention, "measure_activations": measure}
    assert validate_options(options) == {**OPTION_DEFAULTS, **options}
    model = tiny()
    lines = apply_optimizations(model, options)
    assert len(lines) == sum(map(bool, (offload or unsloth, linear, embedding, attention, measure)))
    assert all(is_offloaded(layer) == (offload or unsloth) for layer in model.layers)
    model(TOKENS).backward()
