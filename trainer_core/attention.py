"""Switchable attention: PyTorch's fused SDPA (optionally pinned to one backend) or explicit math.

Two ways a model takes part:

* ``nn.MultiheadAttention`` is replaced (by ``trainer_core.wrapper.replace_attention``) with
  :class:`SDPAMultiheadAttention`, which reuses the very same parameter objects under the same
  names and computes the same outputs with the chosen implementation.
* Any module of your own follows the protocol: it has an ``attention_impl: str`` attribute and
  computes attention with ``attend(q, k, v, impl=self.attention_impl, ...)``. Switching is then
  setting the attribute.

Implementations (:data:`KNOWN_ATTENTION`): ``sdpa`` lets PyTorch pick the kernel,
``sdpa:flash|efficient|cudnn|math`` pins one through ``torch.nn.attention.sdpa_kernel`` (the
call fails if that kernel cannot run the inputs on their device), and ``math`` is the explicit
softmax(QK^T)V written out in torch ops, the reference when debugging a kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
KNOWN_ATTENTION: tuple[str, ...] = ("sdpa", *(f"sdpa:{name}" for name in _BACKENDS), "math")


def check_impl(impl: str) -> str:
    """``impl`` itself if it names a known implementation, else a ValueError listing them."""
    if impl not in KNOWN_ATTENTION:
        raise ValueError(f"unknown attention implementation {impl!r}; known: {', '.join(KNOWN_ATTENTION)}")
    return impl


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    impl: str = "sdpa",
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over ``[..., L, E]`` queries with SDPA's conventions, by implementation ``impl``.

    ``attn_mask`` is boolean (True = may attend) or additive, broadcastable to ``[..., L, S]``.
    """
    if is_causal and attn_mask is not None and check_impl(impl) != "math":  # SDPA takes one or the other
        attn_mask, is_causal = _with_causal(attn_mask, q.size(-2), k.size(-2)), False
    if check_impl(impl) == "math":
        return math_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)[0]
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)
    with sdpa_kernel(_BACKENDS[impl.partition(":")[2]]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T * scale + mask) V written out; also returns the attention weights."""
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.size(-1)))
    if is_causal:
        allowed = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


class SDPAMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s interface and parameters, computed by a chosen implementation.

    Built from a MultiheadAttention, it holds the original module's parameter objects under the same
    names (so state dicts, optimizer state and tied weights carry over). ``need_weights=True``
    (MultiheadAttention's default) needs the attention weights, which only the explicit math
    version produces, so such calls use it whatever ``attention_impl`` says.

    Like MultiheadAttention, it lets ``nn.TransformerEncoderLayer``'s inference fast path (eval
    mode without grad) run PyTorch's fused layer on the same weights instead of calling it;
    ``torch.backends.mha.set_fastpath_enabled(False)`` turns that path off.
    """

    merge_masks = nn.MultiheadAttention.merge_masks  # used by TransformerEncoderLayer's fast path

    def __init__(self, mha: nn.MultiheadAttention, impl: str) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("attention: MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        # Same registration order as MultiheadAttention, so parameter lists line up one to one.
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            self.register_parameter(name, getattr(mha, name))
        self.out_proj = mha.out_proj
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.attention_impl = check_impl(impl)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, attention_impl={self.attention_impl!r}"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        query, key, value = (self._batch_major(t, batched) for t in (query, key, value))
        if not batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        n, length, source = query.size(0), query.size(1), key.size(1)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for t in self._project(query, key, value))
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        mask = self._merged_mask(attn_mask, key_padding_mask, n, length, source, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = math_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = attend(q, k, v, impl=self.attention_impl, attn_mask=mask, dropout_p=dropout_p)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not batched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _batch_major(self, tensor: torch.Tensor, batched: bool) -> torch.Tensor:
        if not batched:
            return tensor.unsqueeze(0)
        return tensor if self.batch_first else tensor.transpose(0, 1)

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> list[torch.Tensor]:
        bias = self.in_proj_bias
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one packed matmul
                return list(F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1))
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True)]

    def _merged_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        n: int,
        length: int,
        source: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """MultiheadAttention's masks (True = blocked) as one additive mask for [N, H, L, S]."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:
                mask = mask.view(n, self.num_heads, length, source)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).view(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask


def _with_causal(mask: torch.Tensor, length: int, source: int) -> torch.Tensor:
    allowed = torch.ones(length, source, dtype=torch.bool, device=mask.device).tril()
    return mask & allowed if mask.dtype == torch.bool else mask.masked_fill(~allowed, float("-inf"))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
