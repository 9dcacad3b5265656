"""Placing layers over devices by a memory budget: the plan, and outputs left unchanged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer_core.placement import parse_size, plan_placement
from trainer_core.wrapper import offload_model


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class LM(nn.Module):
    """Embedding, four blocks, norm and a head tied to the embedding; a position table of its own."""

    def __init__(self, vocab: int = 32, dim: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, dim))
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) + self.pos[: tokens.size(1)]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


BLOCK_BYTES = 2 * (16 * 16 + 16) * 4  # 2176
TABLES = (8 * 16 + 32 * 16) * 4  # pos + emb (shared with head): 2560


def test_layers_fill_the_first_device_in_order_then_the_next() -> None:
    plan = plan_placement(LM(), {"cpu:0": TABLES + 2 * BLOCK_BYTES, "cpu:1": "*"})
    assert plan == {"emb": "cpu:0", "blocks.0": "cpu:0", "blocks.1": "cpu:0",
                    "blocks.2": "cpu:1", "blocks.3": "cpu:1", "norm": "cpu:1", "head": "cpu:0"}


def test_a_tied_head_goes_where_its_shared_weight_already_is() -> None:
    plan = plan_placement(LM(), [("cpu:0", TABLES), ("cpu:1", "*")])
    assert plan["emb"] == "cpu:0" and plan["head"] == "cpu:0"
    assert {plan[f"blocks.{i}"] for i in range(4)} == {"cpu:1"}


def test_repeated_blocks_are_never_split_but_other_modules_are() -> None:
    plan = plan_placement(LM(), {"cpu:0": TABLES + BLOCK_BYTES // 2, "cpu:1": "*"})
    assert "blocks.0" in plan and "blocks.0.fc1" not in plan
    assert plan["blocks.0"] == "cpu:1"
    split = plan_placement(LM(), {"cpu:0": TABLES + BLOCK_BYTES // 2, "cpu:1": "*"}, no_split=())
    assert split["blocks.0.fc1"] == "cpu:0" and split["blocks.0.fc2"] == "cpu:1"


def test_a_policy_too_small_for_the_model_is_refused_naming_the_budgets() -> None:
    with pytest.raises(ValueError, match=r"blocks\.2 needs 2176 more bytes .*cpu:0=7000, cpu:1=100"):
        plan_placement(LM(), {"cpu:0": 7000, "cpu:1": 100})


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="names no device"):
        plan_placement(LM(), {})
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        plan_placement(LM(), {"gpu0": "*"})
    with pytest.raises(ValueError, match="bad memory budget '2 bananas'"):
        plan_placement(LM(), {"cpu": "2 bananas"})


def test_memory_budgets_read_the_usual_units() -> None:
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size(" 1.5 kib ") == 1536
    assert parse_size(4096) == 4096
    assert parse_size("*") is None
    for bad in ("", "-1", "GiB", True, -5):
        with pytest.raises(ValueError):
            parse_size(bad)  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None)
@given(first=st.integers(0, 16000), second=st.integers(0, 16000))
def test_placed_models_give_the_same_outputs_and_gradients(first: int, second: int) -> None:
    torch.manual_seed(0)
    reference, placed = LM(), LM()
    placed.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 32, (2, 6))
    plan = offload_model(placed, [("cpu:0", first), ("cpu:1", second), ("cpu", "*")])
    assert set(plan) >= {"emb", "norm", "head"}
    assert torch.equal(placed(tokens), reference(tokens))
    placed(tokens).sum().backward()
    reference(tokens).sum().backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), placed.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_placing_again_replaces_the_previous_hooks_and_keeps_parameter_objects() -> None:
    model = LM()
    params = [id(p) for p in model.parameters()]
    offload_model(model, {"cpu": "*"})
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 7 + 2  # each placed module, the root (own tensors) and the root's arrival record
    offload_model(model, {"cpu:0": TABLES + BLOCK_BYTES, "cpu:1": "*"})
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert [id(p) for p in model.parameters()] == params


def test_each_placed_module_moves_its_inputs_to_its_planned_device() -> None:
    from trainer_core.placement import _MoveInputs

    model = LM()
    plan = offload_model(model, {"cpu:0": TABLES + 2 * BLOCK_BYTES, "cpu:1": "*"})
    for name, key in plan.items():
        hooks = model.get_submodule(name)._forward_pre_hooks.values()
        assert [h.device for h in hooks if isinstance(h, _MoveInputs)] == [torch.device(key)], name
