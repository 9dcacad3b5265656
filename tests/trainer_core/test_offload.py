"""Activation offload keeps gradients bitwise identical while keeping only block inputs."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer_core.offload import (
    ActivationMeter,
    NoBlocksWarning,
    apply_activation_offload,
    find_repeated_blocks,
    is_offloaded,
    select_blocks,
)

Grads = dict[str, torch.Tensor]


class Block(nn.Module):
    """A residual MLP block with dropout, an extra positional argument, kwargs and a tuple output."""

    def __init__(self, dim: int, p: float = 0.2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor, scale: float, *, bias: torch.Tensor | None = None,
                extras: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc2(self.drop(F.gelu(self.fc1(self.norm(x)))))
        if bias is not None:
            h = h + bias
        for extra in extras:
            h = h * extra
        return x + scale * h, h.detach().abs().mean()


class Net(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 3, vocab: int = 11, p: float = 0.2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, p) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, tokens: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(tokens)
        extras = () if gate is None else (gate,)
        for layer in self.layers:
            x, _ = layer(x, 0.5, bias=self.bias, extras=extras)
        return F.cross_entropy(self.head(x).flatten(0, 1), tokens.flatten())


def make_pair(seed: int = 0, **kwargs: int | float) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    plain = Net(**kwargs)
    return plain, copy.deepcopy(plain)


def tokens(batch: int = 2, length: int = 5, vocab: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def grads_after(model: nn.Module, step: Callable[[], torch.Tensor], seed: int = 7) -> Grads:
    torch.manual_seed(seed)
    step().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_bitwise_equal(a: Grads, b: Grads) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"gradient of {name} differs"


def test_offloaded_blocks_give_bitwise_identical_gradients_with_dropout_kwargs_and_tuples() -> None:
    plain, offloaded = make_pair()
    names = apply_activation_offload(offloaded)
    assert names == ["layers.0", "layers.1", "layers.2"]
    gate = torch.rand(2, 5, 16, requires_grad=True)
    expected = grads_after(plain, lambda: plain(tokens(), gate))
    expected_gate = gate.grad.clone()
    gate.grad = None
    assert_bitwise_equal(grads_after(offloaded, lambda: offloaded(tokens(), gate)), expected)
    assert torch.equal(gate.grad, expected_gate)


def test_dropout_really_draws_random_masks_so_the_rng_restore_matters() -> None:
    plain, _ = make_pair()
    first = grads_after(plain, lambda: plain(tokens()), seed=1)
    plain.zero_grad(set_to_none=True)
    second = grads_after(plain, lambda: plain(tokens()), seed=2)
    assert not torch.equal(first["layers.0.fc1.weight"], second["layers.0.fc1.weight"])


def test_frozen_parameters_and_block_inputs_without_grad_keep_gradients_identical() -> None:
    plain, offloaded = make_pair()
    for model in (plain, offloaded):
        model.emb.requires_grad_(False)  # the first block's input needs no grad
        model.layers[1].requires_grad_(False)
    apply_activation_offload(offloaded)
    expected = grads_after(plain, lambda: plain(tokens()))
    got = grads_after(offloaded, lambda: offloaded(tokens()))
    assert_bitwise_equal(got, expected)
    assert not any(name.startswith(("emb.", "layers.1.")) for name in got)


def test_bfloat16_autocast_gradients_match_the_plain_model() -> None:
    plain, offloaded = make_pair()
    apply_activation_offload(offloaded)

    def step(model: Net) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(tokens())
        return run

    assert_bitwise_equal(grads_after(offloaded, step(offloaded)), grads_after(plain, step(plain)))


def test_two_backward_passes_accumulate_identically() -> None:
    plain, offloaded = make_pair()
    apply_activation_offload(offloaded)
    for model in (plain, offloaded):
        for seed in (3, 4):
            torch.manual_seed(seed)
            model(tokens(seed=seed)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_parameter_names_and_state_dict_keys_are_unchanged() -> None:
    plain, offloaded = make_pair()
    apply_activation_offload(offloaded)
    assert list(offloaded.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in offloaded.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [type(m) for m in offloaded.modules()] == [type(m) for m in plain.modules()]
    offloaded.load_state_dict(plain.state_dict())


def test_distributed_data_parallel_over_offloaded_blocks_matches_plain(tmp_path: pytest.TempPathFactory) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    plain, offloaded = make_pair()
    apply_activation_offload(offloaded)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(offloaded)
        got = grads_after(ddp, lambda: ddp(tokens()))
    finally:
        dist.destroy_process_group()
    expected = grads_after(plain, lambda: plain(tokens()))
    assert_bitwise_equal({k.removeprefix("module."): v for k, v in got.items()}, expected)


def test_block_hooks_run_once_per_forward_not_again_during_recompute() -> None:
    _, offloaded = make_pair()
    calls: list[str] = []
    offloaded.layers[0].register_forward_pre_hook(lambda *_: calls.append("pre"))
    offloaded.layers[0].register_forward_hook(lambda *_: calls.append("post"))
    apply_activation_offload(offloaded)
    offloaded(tokens()).backward()
    assert calls == ["pre", "post"]


def test_without_grad_the_block_runs_plainly_and_gives_the_same_output() -> None:
    plain, offloaded = make_pair()
    apply_activation_offload(offloaded)
    plain.eval()
    offloaded.eval()
    with torch.no_grad():
        assert torch.equal(plain(tokens()), offloaded(tokens()))


def test_a_deep_copy_of_an_offloaded_model_runs_its_own_blocks() -> None:
    _, offloaded = make_pair()
    apply_activation_offload(offloaded)
    clone = copy.deepcopy(offloaded)
    assert is_offloaded(clone.layers[0])
    clone.zero_grad()
    grads = grads_after(clone, lambda: clone(tokens()))
    assert "layers.0.fc1.weight" in grads
    assert all(p.grad is None for p in offloaded.parameters())


def test_applying_twice_wraps_each_block_once() -> None:
    plain, offloaded = make_pair()
    apply_activation_offload(offloaded)
    wrapper = offloaded.layers[0].forward
    assert apply_activation_offload(offloaded) == ["layers.0", "layers.1", "layers.2"]
    assert offloaded.layers[0].forward is wrapper
    assert_bitwise_equal(grads_after(offloaded, lambda: offloaded(tokens())),
                         grads_after(plain, lambda: plain(tokens())))


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(2, 12), layers=st.integers(2, 4), p=st.sampled_from([0.0, 0.3]),
       batch=st.integers(1, 3), length=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_gradients_are_bitwise_identical_for_any_small_shape(
    dim: int, layers: int, p: float, batch: int, length: int, seed: int
) -> None:
    plain, offloaded = make_pair(seed, dim=dim, layers=layers, p=p)
    apply_activation_offload(offloaded)
    data = tokens(batch, length, seed=seed)
    assert_bitwise_equal(grads_after(offloaded, lambda: offloaded(data), seed),
                         grads_after(plain, lambda: plain(data), seed))


# --- choosing blocks --------------------------------------------------------------------------


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.decoder = nn.ModuleDict({"stack": nn.ModuleList(Block(8) for _ in range(3))})
        self.heads = nn.ModuleList([nn.Linear(8, 2), nn.ReLU()])


def test_default_blocks_are_the_largest_stack_of_same_class_modules() -> None:
    names = [name for name, _ in find_repeated_blocks(Nested())]
    assert names == ["decoder.stack.0", "decoder.stack.1", "decoder.stack.2"]


def test_blocks_can_be_chosen_by_class_or_by_a_full_name_pattern_outermost_first() -> None:
    model = Nested()
    assert [n for n, _ in select_blocks(model, nn.Linear)] == [
        "encoder.0", "encoder.1", "decoder.stack.0.fc1", "decoder.stack.0.fc2",
        "decoder.stack.1.fc1", "decoder.stack.1.fc2", "decoder.stack.2.fc1", "decoder.stack.2.fc2", "heads.0"]
    assert [n for n, _ in select_blocks(model, (Block, nn.Linear))][2:] == [
        "decoder.stack.0", "decoder.stack.1", "decoder.stack.2", "heads.0"]
    assert [n for n, _ in select_blocks(model, r"decoder\.stack\.[02]")] == ["decoder.stack.0", "decoder.stack.2"]
    assert [n for n, _ in select_blocks(model, r"encoder.*")] == ["encoder"]


def test_containers_are_looked_into_never_chosen_since_they_are_never_called() -> None:
    model = Nested()
    assert [n for n, _ in select_blocks(model, r"decoder\.stack.*")] == [
        "decoder.stack.0", "decoder.stack.1", "decoder.stack.2"]
    assert [n for n, _ in select_blocks(model, nn.ModuleList)] == []
    grid = nn.Module()
    grid.rows = nn.ModuleList(nn.ModuleList(Block(4) for _ in range(2)) for _ in range(3))
    assert [n for n, _ in find_repeated_blocks(grid)] == [f"rows.{r}.{c}" for r in range(3) for c in range(2)]


def test_default_blocks_include_every_module_of_the_repeated_class() -> None:
    towers = nn.Module()
    towers.left = nn.ModuleList(Block(4) for _ in range(3))
    towers.right = nn.Sequential(Block(4), Block(4))
    towers.heads = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    names = [n for n, _ in find_repeated_blocks(towers)]
    assert names == ["left.0", "left.1", "left.2", "right.0", "right.1"]


def test_a_block_registered_twice_is_wrapped_once() -> None:
    model = nn.Module()
    shared = Block(4)
    model.a, model.b = shared, shared
    assert [n for n, _ in select_blocks(model, Block)] == ["a"]


def test_nothing_to_offload_warns() -> None:
    with pytest.warns(NoBlocksWarning, match="nothing matched"):
        assert apply_activation_offload(Nested(), r"nope\.\d+") == []
    with pytest.warns(NoBlocksWarning, match="no repeated blocks"):
        assert apply_activation_offload(nn.Linear(2, 2)) == []


def test_bad_block_specs_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_blocks(Nested(), "layers[")
    with pytest.raises(ValueError, match="module classes or a name pattern"):
        select_blocks(Nested(), (int,))  # type: ignore[arg-type]


# --- measuring --------------------------------------------------------------------------------


def test_offload_moves_all_but_the_block_inputs_out_of_the_saved_activations() -> None:
    plain, offloaded = make_pair(dim=16, layers=3)
    gate = torch.rand(2, 5, 16)
    with ActivationMeter() as plain_meter:
        plain(tokens(), gate)
    with ActivationMeter() as meter:
        loss = offloaded(tokens(), gate) if apply_activation_offload(offloaded) else None
    block_input = 2 * 5 * 16 * 4
    # Each block keeps its own input; the shared gate (a kwarg inside a tuple) counts once and
    # the bias parameter passed as a kwarg is model state, not an activation.
    assert meter.cpu_bytes == 3 * block_input + block_input
    assert plain_meter.cpu_bytes == 0
    assert meter.bytes < plain_meter.bytes / 3
    assert loss is not None
    loss.backward()


def test_checkpoint_alone_keeps_block_inputs_on_the_compute_device() -> None:
    plain, _ = make_pair(p=0.0)
    x = plain.emb(tokens())
    with ActivationMeter() as meter:
        for layer in plain.layers:
            x, _ = torch.utils.checkpoint.checkpoint(layer, x, 0.5, use_reentrant=False, bias=plain.bias)
    assert meter.bytes == 3 * 2 * 5 * 16 * 4
    assert meter.cpu_bytes == 0
    assert meter.metrics() == {"train/activation_bytes": float(meter.bytes), "train/activation_cpu_bytes": 0.0}


def test_meter_counts_each_storage_once_and_skips_parameters() -> None:
    x = torch.randn(8, 4, requires_grad=True)
    layer = nn.Linear(4, 4)
    with ActivationMeter() as meter:
        h = layer(x)  # saves x and the weight, a parameter
        y = (h * h).sum()  # saves h twice
    assert meter.bytes == x.nbytes + h.nbytes
    y.backward()


def test_the_meter_does_not_change_gradients_and_resets_on_entry() -> None:
    plain, metered = make_pair()
    apply_activation_offload(metered)
    meter = ActivationMeter()

    def step() -> torch.Tensor:
        with meter:
            return metered(tokens())

    assert_bitwise_equal(grads_after(metered, step), grads_after(plain, lambda: plain(tokens())))
    first = (meter.bytes, meter.cpu_bytes)
    metered.zero_grad()
    grads_after(metered, step)
    assert (meter.bytes, meter.cpu_bytes) == first
