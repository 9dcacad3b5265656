"""Switching attention implementations keeps MultiheadAttention's parameters and outputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer_core.attention import KNOWN_ATTENTION, SDPAMultiheadAttention, attend, math_attention
from trainer_core.wrapper import NoMatchWarning, replace_attention

CPU_IMPLS = ("sdpa", "sdpa:math", "sdpa:flash", "math")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)


def swapped(mha: nn.MultiheadAttention, impl: str) -> nn.Module:
    model = nn.Sequential(mha)
    assert replace_attention(model, impl) == ["0"]
    return model[0]


def inputs(batch_first: bool, n: int = 2, length: int = 5, source: int = 7, dim: int = 8,
           kdim: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = torch.randn(n, length, dim), torch.randn(n, source, kdim), torch.randn(n, source, kdim)
    return (q, k, v) if batch_first else (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_swapped_attention_gives_multihead_attention_outputs_and_weights(impl: str, batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    q, k, v = inputs(batch_first)
    padding = torch.tensor([[False] * 6 + [True], [False] * 4 + [True] * 3])
    causal_ish = torch.rand(5, 7) > 0.7
    causal_ish[:, 0] = False
    expected = mha(q, k, v, key_padding_mask=padding, attn_mask=causal_ish)
    new = swapped(mha, impl)
    got = new(q, k, v, key_padding_mask=padding, attn_mask=causal_ish)
    assert close(got[0], expected[0]) and close(got[1], expected[1])
    no_weights = new(q, k, v, key_padding_mask=padding, attn_mask=causal_ish, need_weights=False)
    assert no_weights[1] is None and close(no_weights[0], expected[0])


def test_per_head_float_masks_unaveraged_weights_and_unbatched_inputs_match() -> None:
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2).eval()
    q, k, v = inputs(batch_first=False)
    mask = torch.randn(2 * 2, 5, 7)
    expected = mha(q, k, v, attn_mask=mask, average_attn_weights=False)
    new = swapped(mha, "sdpa")
    got = new(q, k, v, attn_mask=mask, average_attn_weights=False)
    assert close(got[0], expected[0]) and close(got[1], expected[1])
    single = q[:, 0], k[:, 0], v[:, 0]
    expected_single, got_single = mha(*single), new(*single)
    assert got_single[0].shape == (5, 8) and close(got_single[0], expected_single[0])
    assert close(got_single[1], expected_single[1])


def test_cross_attention_with_its_own_key_and_value_sizes_matches() -> None:
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 4, kdim=6, vdim=6, batch_first=True).eval()
    q, k, v = inputs(batch_first=True, kdim=6)
    expected = mha(q, k, v, need_weights=False)[0]
    assert close(swapped(mha, "math")(q, k, v, need_weights=False)[0], expected)


def test_causal_flag_without_a_mask_means_a_causal_mask() -> None:
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 6, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    expected = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert close(swapped(mha, "sdpa")(x, x, x, is_causal=True, need_weights=False)[0], expected)


def test_the_swap_keeps_the_same_parameter_objects_names_and_state_dict() -> None:
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    before = list(mha.named_parameters())
    keys = list(mha.state_dict())
    new = swapped(mha, "sdpa")
    assert [(n, id(p)) for n, p in new.named_parameters()] == [(n, id(p)) for n, p in before]
    assert list(new.state_dict()) == keys
    new.load_state_dict(mha.state_dict())


def test_a_transformer_encoder_trains_to_the_same_gradients_after_the_swap() -> None:
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    plain = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    swapped_model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    swapped_model.load_state_dict(plain.state_dict())
    assert replace_attention(swapped_model, "math") == ["layers.0.self_attn", "layers.1.self_attn"]
    x = torch.randn(3, 5, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    for model in (plain, swapped_model):
        model(x, src_key_padding_mask=padding).pow(2).mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), swapped_model.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    plain.eval()
    swapped_model.eval()
    with torch.no_grad():
        expected = plain(x, src_key_padding_mask=padding)
        assert close(swapped_model(x, src_key_padding_mask=padding), expected)  # the fused fast path
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            assert close(swapped_model(x, src_key_padding_mask=padding), expected)  # the swapped module
        finally:
            torch.backends.mha.set_fastpath_enabled(True)


class ProtocolAttention(nn.Module):
    """A module of one's own following the protocol: an attention_impl attribute and attend()."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.attention_impl = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return attend(q, k, v, impl=self.attention_impl, is_causal=True).transpose(1, 2).flatten(2)


def test_protocol_modules_switch_by_their_attention_impl_attribute() -> None:
    model = nn.Sequential(ProtocolAttention(), nn.Sequential(ProtocolAttention()))
    x = torch.randn(2, 5, 8)
    expected = model(x)
    assert replace_attention(model, "math") == ["0", "1.0"]
    assert model[0].attention_impl == "math" and model[1][0].attention_impl == "math"
    assert close(model(x), expected)


@settings(max_examples=40, deadline=None)
@given(impl=st.sampled_from(CPU_IMPLS), length=st.integers(1, 6), source=st.integers(1, 6),
       causal=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_every_cpu_implementation_agrees_with_the_math_reference(
    impl: str, length: int, source: int, causal: bool, masked: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 4, generator=generator) for n in (length, source, source))
    mask = torch.rand(length, source, generator=generator) > 0.3 if masked else None
    if mask is not None:
        mask[:, 0] = True  # every query may attend somewhere
    expected = math_attention(q, k, v, attn_mask=mask, is_causal=causal)[0]
    assert close(attend(q, k, v, impl=impl, attn_mask=mask, is_causal=causal), expected)


def test_unknown_implementations_and_unsupported_modules_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'; known: sdpa, sdpa:flash"):
        replace_attention(nn.Sequential(nn.MultiheadAttention(4, 1)), "flash")
    model = nn.Sequential(nn.MultiheadAttention(4, 1), nn.MultiheadAttention(4, 1, add_bias_kv=True))
    with pytest.raises(ValueError, match="1 uses add_bias_kv"):
        replace_attention(model, "sdpa")
    assert type(model[0]) is nn.MultiheadAttention  # nothing was replaced
    assert set(KNOWN_ATTENTION) >= set(CPU_IMPLS)


def test_a_model_without_attention_gets_a_warning() -> None:
    with pytest.warns(NoMatchWarning, match="no MultiheadAttention"):
        assert replace_attention(nn.Linear(2, 2), "sdpa") == []


def test_switching_again_changes_the_implementation_of_the_swapped_module() -> None:
    model = nn.Sequential(nn.MultiheadAttention(4, 1))
    replace_attention(model, "sdpa")
    swapped_module = model[0]
    assert replace_attention(model, "math") == ["0"]
    assert model[0] is swapped_module and isinstance(swapped_module, SDPAMultiheadAttention)
    assert swapped_module.attention_impl == "math"
