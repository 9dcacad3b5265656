"""Module replacement keeps weights, ties, placement, modes and hooks; the wrappers stay honest."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer_core.wrapper import (
    KNOWN_LINEAR,
    ComputeDtypeLinear,
    NoMatchWarning,
    autocast_forward,
    compile_model,
    replace_embedding,
    replace_linear,
    replace_modules,
)


class TiedLM(nn.Module):
    """An embedding tied to the output projection, around a small MLP."""

    def __init__(self, vocab: int = 13, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.emb(tokens)))


def lm(seed: int = 0) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM()


TOKENS = torch.tensor([[1, 4, 7, 12], [0, 3, 3, 9]])


def fresh_copy(old: nn.Linear) -> nn.Linear:
    """A factory that builds a brand-new Linear and copies the values (no parameter sharing)."""
    new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    return new


def test_a_weight_preserving_swap_leaves_outputs_and_state_dict_unchanged() -> None:
    model = lm()
    before, keys = model(TOKENS), list(model.state_dict())
    names = replace_modules(model, nn.Linear, fresh_copy)
    assert names == ["mlp.0", "mlp.2", "head"]
    assert torch.equal(model(TOKENS), before)
    assert list(model.state_dict()) == keys


def test_tied_weights_stay_tied_when_the_factory_builds_new_parameters() -> None:
    model = lm()
    replace_modules(model, nn.Linear, fresh_copy)
    assert model.head.weight is model.emb.weight
    assert model.mlp[0].weight is not model.emb.weight
    model(TOKENS).sum().backward()
    assert len([p for p in model.parameters()]) == 5  # emb/head weight once, two Linear weights and biases


def test_a_new_parameter_of_another_shape_is_not_tied() -> None:
    model = lm()
    replace_modules(model, lambda name, _m: name == "head", lambda old: nn.Linear(8, 5, bias=False))
    assert model.head.weight.shape == (5, 8)
    assert model.emb.weight.shape == (13, 8)


def test_a_module_registered_under_two_names_is_replaced_once_and_stays_shared() -> None:
    model = nn.Module()
    shared = nn.Linear(3, 3)
    model.a = shared
    model.inner = nn.Sequential(shared, nn.ReLU())
    built: list[nn.Module] = []

    def factory(old: nn.Module) -> nn.Module:
        built.append(fresh_copy(old))
        return built[-1]

    assert replace_modules(model, nn.Linear, factory) == ["a"]
    assert len(built) == 1
    assert model.a is built[0] and model.inner[0] is built[0]


def test_a_predicate_matching_one_name_of_a_shared_module_replaces_it_everywhere() -> None:
    model = nn.Module()
    model.a = model.b = nn.Linear(2, 2)
    replace_modules(model, lambda name, _m: name == "b", fresh_copy)
    assert model.a is model.b
    assert type(model.a) is nn.Linear


def test_only_the_outermost_match_is_replaced() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
    seen: list[str] = []
    names = replace_modules(model, nn.Sequential, lambda old: (seen.append(type(old).__name__), old[0])[1])
    assert names == ["0"] and seen == ["Sequential"]
    assert isinstance(model[0], nn.Linear)


def test_the_replacement_takes_the_old_dtype_device_and_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 4).double().eval(), nn.Linear(4, 4).to("meta"))
    replace_modules(model, lambda name, _m: name == "0", lambda old: nn.Linear(4, 4))
    replace_modules(model, lambda name, _m: name == "1", lambda old: nn.Linear(4, 4))
    assert model[0].weight.dtype == torch.float64 and not model[0].training
    assert model[1].weight.device.type == "meta" and model[1].training


def test_forward_pre_backward_hooks_move_to_the_replacement_and_handles_still_remove_them() -> None:
    model = lm()
    calls: list[str] = []
    handles = [
        model.head.register_forward_pre_hook(lambda *_: calls.append("pre")),
        model.head.register_forward_pre_hook(lambda _m, a, kw: calls.append("pre_kwargs"), with_kwargs=True),
        model.head.register_forward_hook(lambda *_: calls.append("post")),
        model.head.register_full_backward_hook(lambda *_: calls.append("backward")),
        model.head.register_full_backward_pre_hook(lambda *_: calls.append("backward_pre")),
    ]
    old_head = model.head
    replace_linear(model, fresh_copy)
    assert model.head is not old_head
    model(TOKENS).sum().backward()
    assert calls == ["pre", "pre_kwargs", "post", "backward_pre", "backward"]
    for handle in handles:
        handle.remove()
    calls.clear()
    model(TOKENS).sum().backward()
    assert calls == []


def test_a_forward_hook_can_still_rewrite_the_output() -> None:
    model = lm()
    model.mlp[2].register_forward_hook(lambda _m, _a, out: out * 0)
    replace_linear(model, "linear")
    assert torch.count_nonzero(model.mlp(torch.ones(1, 8))) == 0


def test_nothing_matching_is_a_warning() -> None:
    with pytest.warns(NoMatchWarning, match="nothing in Sequential matched Conv1d"):
        assert replace_modules(nn.Sequential(nn.Linear(2, 2)), nn.Conv1d, lambda old: old) == []
    with pytest.warns(NoMatchWarning, match="Embedding"):
        assert replace_embedding(nn.Sequential(nn.Linear(2, 2)), "embedding") == []


def test_bad_targets_and_factories_are_refused() -> None:
    with pytest.raises(TypeError, match="module classes or a predicate"):
        replace_modules(lm(), (int,), lambda old: old)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="returned int for head"):
        replace_modules(lm(), lambda name, _m: name == "head", lambda old: 3)  # type: ignore[arg-type,return-value]


# --- linear and embedding registries ----------------------------------------------------------


def test_named_linear_swaps_reuse_the_very_same_parameters() -> None:
    model = lm()
    params = [id(p) for p in model.parameters()]
    for name in KNOWN_LINEAR:
        replace_linear(model, name)
        assert [id(p) for p in model.parameters()] == params


def test_plain_linear_swap_is_bitwise_identical_and_undoes_a_bf16_swap() -> None:
    model = lm()
    before = model(TOKENS)
    replace_linear(model, "bf16")
    assert all(type(m) is ComputeDtypeLinear for m in (model.mlp[0], model.mlp[2], model.head))
    replace_linear(model, "linear")
    assert all(type(m) is nn.Linear for m in (model.mlp[0], model.mlp[2], model.head))
    assert torch.equal(model(TOKENS), before)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 4), fan_in=st.integers(1, 24), fan_out=st.integers(1, 24), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_bf16_linear_matches_float32_within_bfloat16_precision(
    batch: int, fan_in: int, fan_out: int, bias: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(fan_in, fan_out, bias=bias))
    x = torch.randn(batch, fan_in)
    expected = model(x)
    replace_linear(model, "bf16")
    got = model(x)
    assert got.dtype == torch.float32
    reference = torch.nn.functional.linear(x.bfloat16(), model[0].weight.bfloat16(),
                                           None if model[0].bias is None else model[0].bias.bfloat16()).float()
    assert torch.equal(got, reference)
    assert torch.allclose(got, expected, atol=0.05 * (1 + expected.abs().max().item()), rtol=0.02)


def test_bf16_linear_trains_the_float32_master_weights() -> None:
    model = lm()
    replace_linear(model, "bf16")
    model(TOKENS).sum().backward()
    assert model.mlp[0].weight.dtype == torch.float32
    assert model.mlp[0].weight.grad is not None and model.mlp[0].weight.grad.dtype == torch.float32


def test_linear_subclasses_such_as_attention_out_projections_are_left_alone() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    assert replace_linear(model, "bf16") == ["1"]
    assert type(model[0].out_proj) is not ComputeDtypeLinear


def test_unknown_factory_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown linear 'int8'; known: linear, bf16, fp16"):
        replace_linear(lm(), "int8")
    with pytest.raises(ValueError, match="unknown embedding 'bf16'; known: embedding, sparse"):
        replace_embedding(lm(), "bf16")


def test_sparse_embedding_keeps_values_and_tie_and_gives_sparse_gradients() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0))
    weight = model[0].weight
    before = model(TOKENS % 10)
    assert replace_embedding(model, "sparse") == ["0"]
    assert model[0].weight is weight and model[0].padding_idx == 0
    out = model(TOKENS % 10)
    assert torch.equal(out, before)
    out.sum().backward()
    assert weight.grad is not None and weight.grad.is_sparse


def test_plain_embedding_swap_keeps_the_tie_with_the_head() -> None:
    model = lm()
    before = model(TOKENS)
    replace_embedding(model, "embedding")
    assert model.head.weight is model.emb.weight
    assert torch.equal(model(TOKENS), before)


# --- forward wrappers -------------------------------------------------------------------------


def test_autocast_forward_computes_in_the_chosen_dtype_without_touching_parameters() -> None:
    model = lm()
    keys = list(model.state_dict())
    assert autocast_forward(model.mlp, torch.bfloat16) is model.mlp
    assert model.mlp(torch.ones(2, 8)).dtype == torch.bfloat16
    assert model.mlp[0].weight.dtype == torch.float32 and list(model.state_dict()) == keys
    autocast_forward(model.mlp, torch.float16)
    assert model.mlp(torch.ones(2, 8)).dtype == torch.float16


def test_autocast_forward_survives_a_deep_copy() -> None:
    model = autocast_forward(nn.Sequential(nn.Linear(2, 2)))
    clone = copy.deepcopy(model)
    assert clone(torch.ones(1, 2)).dtype == torch.bfloat16
    assert clone.forward.module is clone  # type: ignore[attr-defined]


def test_compile_model_compiles_in_place_with_the_same_outputs_and_keys() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    before, keys = model(x), list(model.state_dict())
    assert compile_model(model, backend="eager") is model
    assert model._compiled_call_impl is not None
    assert torch.equal(model(x), before)
    assert list(model.state_dict()) == keys


def test_compile_model_refuses_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown compile backend 'turbo'"):
        compile_model(nn.Linear(2, 2), backend="turbo")


def test_compile_model_without_a_toolchain_warns_and_leaves_the_model_alone(monkeypatch: Any) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    model = nn.Linear(2, 2)
    with pytest.warns(RuntimeWarning, match="needs a C/C\\+\\+ compiler"):
        assert compile_model(model) is model
    assert model._compiled_call_impl is None
