"""8- or 4-bit storage for the token-long tensors a :class:`~podkv.cache.PodCache` holds (issue 21: PoD composed
with quantized KV).

Each token's vector of each head is cut into groups of ``group`` channels, and each group is stored as
``bits``-bit codes with its own scale and zero in the model's dtype (asymmetric round-to-nearest over 2^bits − 1
steps: x ≈ code·scale + zero, error <= scale/2 = (max − min)/(2·(2^bits − 1)) of the group). That is
bits + 2·(dtype bits)/group bits per element: with groups of 64 in fp32, 9 at 8 bits, the layout of the ``kv8``
peer (transformers' QuantizedCache, HQQ backend, groups of 64 along the head dim), so the two compare at the
same bits; 5 at 4 bits. Why 4 bits too: KIVI (Liu et al. 2024) reports 4-bit per-token fake quantization of both
K and V close to fp16. At 4 bits two codes share a byte: channels [0, D/2) in the low nibble, [D/2, D) in the
high one, so packing is two slices, not an interleave.

Why not HQQ itself: its half-quadratic optimisation took 6.5 s per 4K-token tensor of SmolLM2 on our CPU
(60 such tensors per prefill), and at 8 bits it buys nothing measurable (the kv8 peer's NLL equals dense's to
1e-4); HQQ without the optimisation is this same round-to-nearest. Per-token groups quantise each token once,
when it arrives, so there is no residual window to re-quantise.

Reads dequantise only what is indexed: ``store[:, h0:h1, lo:hi]`` -> float tensor (B, h, hi − lo, D).
"""

from __future__ import annotations

import torch

from podkv.errors import PodError

GROWTH = 128  # tokens of spare room the buffers grow by (as PodCache's float buffers)
GROUP = 64  # channels per scale and zero (the kv8 peer's group), or the head dim when smaller


class QuantTokens:
    """A (B, H, T, D) tensor held as ``bits``-bit codes (uint8; two per byte at 4 bits) + per-(token, head, group)
    scale and zero, growing along T."""

    def __init__(self, like: torch.Tensor, group: int, bits: int = 8):
        B, H, _, D = like.shape
        if D % group:
            raise PodError(f"PodCache field 'kv_group' = {group} must divide the head dim {D}")
        if bits == 4 and D % 2:
            raise PodError(f"PodCache field 'kv_bits' = 4 packs two channels per byte: the head dim {D} must be even")
        self.group, self.bits, self.dtype, self.T, self.D = group, bits, like.dtype, 0, D
        self.codes = torch.empty(B, H, GROWTH, D * bits // 8, dtype=torch.uint8, device=like.device)
        self.scale = torch.empty(B, H, GROWTH, D // group, dtype=like.dtype, device=like.device)
        self.zero = torch.empty_like(self.scale)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.codes.shape[:2], self.T, self.D))

    def append(self, x: torch.Tensor) -> None:
        """Quantise the new tokens x (B, H, C, D) and store them after the held ones."""
        C = x.shape[2]
        if self.T + C > self.codes.shape[2]:
            grow = self.T + C + GROWTH
            self.codes, self.scale, self.zero = (_grown(t, self.T, grow) for t in (self.codes, self.scale, self.zero))
        codes, scale, zero = quantize(x, self.group, self.bits)
        self.codes[:, :, self.T:self.T + C] = codes
        self.scale[:, :, self.T:self.T + C] = scale
        self.zero[:, :, self.T:self.T + C] = zero
        self.T += C

    def __getitem__(self, index) -> torch.Tensor:
        """Dequantised ``tensor[index]``; ``index`` may address the batch, head and token dims, not channels."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError("QuantTokens indexes batch, head and token dims only")
        index = index + (slice(None),) * (3 - len(index))
        T = slice(0, self.T)
        held = [t[:, :, T] for t in (self.codes, self.scale, self.zero)]
        return dequantize(*(t[index] for t in held), self.group, self.dtype, self.bits)

    def crop(self, length: int) -> None:
        self.T = min(self.T, length)

    def map_batch(self, fn) -> None:
        """Apply a batch-dim edit (beam reorder, repeat, select) to the held rows."""
        self.codes, self.scale, self.zero = (fn(t[:, :, :self.T]).contiguous() for t in (self.codes, self.scale, self.zero))

    def tensors(self) -> list[torch.Tensor]:
        """What is held for the T tokens: codes, scales, zeros."""
        return [t[:, :, :self.T] for t in (self.codes, self.scale, self.zero)]

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


def quantize(x: torch.Tensor, group: int, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., D) -> uint8 codes (..., D·bits/8), scale and zero (..., D // group): asymmetric round-to-nearest."""
    top = 2 ** bits - 1
    g = x.float().unflatten(-1, (-1, group))
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / top).clamp(min=torch.finfo(torch.float32).tiny)
    codes = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, top).to(torch.uint8).flatten(-2)
    if bits == 4:
        low, high = codes.chunk(2, dim=-1)
        codes = low | high << 4
    return codes, scale.to(x.dtype), lo.to(x.dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, dtype,
               bits: int = 8) -> torch.Tensor:
    """Inverse of :func:`quantize`: codes (..., D·bits/8) -> (..., D) in ``dtype``."""
    if bits == 4:
        codes = torch.cat([codes & 15, codes >> 4], dim=-1)
    g = codes.unflatten(-1, (-1, group)).to(dtype)
    return torch.addcmul(zero[..., None], g, scale[..., None]).flatten(-2)


def _grown(t: torch.Tensor, held: int, size: int) -> torch.Tensor:
    out = t.new_empty(*t.shape[:2], size, t.shape[-1])
    out[:, :, :held] = t[:, :, :held]
    return out
