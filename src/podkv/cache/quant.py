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

KIVI's layout for keys (``key_quant="channel"``, :class:`QuantChannels`): KIVI (Liu et al. 2024) found that keys
have outlier *channels* (fixed dims with large magnitude, RoPE or not) while values do not, so a per-token group
of key channels spends its range on the outlier and rounds the rest coarsely. Keys are then quantised per channel
over groups of ``group`` consecutive tokens; the tokens of a group that is not full yet wait in the model's dtype
(KIVI's residual), so the bits per element are the same as the per-token layout's once the group fills.
"""

from __future__ import annotations

import torch

from podkv.errors import PodError

GROWTH = 128  # tokens of spare room the buffers grow by (as PodCache's float buffers)
GROUP = 64  # channels per scale and zero (the kv8 peer's group), or the head dim when smaller


class QuantStore:
    """What both layouts share: a (B, H, T, D) tensor that grows along T, read by indexing (dequantised)."""

    T: int
    D: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.codes.shape[:2], self.T, self.D))

    def tensors(self) -> list[torch.Tensor]:
        """What is held for the T tokens: codes, scales, zeros (and KIVI's float residual)."""
        raise NotImplementedError

    def reserved_bytes(self) -> int:
        raise NotImplementedError


def _check_bits(D: int, bits: int) -> None:
    if bits == 4 and D % 2:
        raise PodError(f"PodCache field 'kv_bits' = 4 packs two channels per byte: the head dim {D} must be even")


class QuantTokens(QuantStore):
    """A (B, H, T, D) tensor held as ``bits``-bit codes (uint8; two per byte at 4 bits) + per-(token, head, group)
    scale and zero, growing along T."""

    def __init__(self, like: torch.Tensor, group: int, bits: int = 8):
        B, H, _, D = like.shape
        if D % group:
            raise PodError(f"PodCache field 'kv_group' = {group} must divide the head dim {D}")
        _check_bits(D, bits)
        self.group, self.bits, self.dtype, self.T, self.D = group, bits, like.dtype, 0, D
        self.codes = torch.empty(B, H, GROWTH, D * bits // 8, dtype=torch.uint8, device=like.device)
        self.scale = torch.empty(B, H, GROWTH, D // group, dtype=like.dtype, device=like.device)
        self.zero = torch.empty_like(self.scale)

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
        return [t[:, :, :self.T] for t in (self.codes, self.scale, self.zero)]

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


class QuantChannels(QuantStore):
    """KIVI's key layout: a (B, H, T, D) tensor whose full groups of ``group`` tokens are held as ``bits``-bit codes
    with a scale and zero per (group, head, channel); the last ``T mod group`` tokens stay in the model's dtype
    until their group fills."""

    def __init__(self, like: torch.Tensor, group: int, bits: int = 8):
        B, H, _, D = like.shape
        _check_bits(D, bits)
        self.group, self.bits, self.dtype, self.D = group, bits, like.dtype, D
        self.Tq = 0  # tokens held as codes: a multiple of ``group``
        room = -(-GROWTH // group) * group
        self.codes = torch.empty(B, H, room, D * bits // 8, dtype=torch.uint8, device=like.device)
        self.scale = torch.empty(B, H, room // group, D, dtype=like.dtype, device=like.device)
        self.zero = torch.empty_like(self.scale)
        self.residual = like[:, :, :0].clone()

    @property
    def T(self) -> int:
        return self.Tq + self.residual.shape[2]

    def append(self, x: torch.Tensor) -> None:
        """Add tokens x (B, H, C, D): every group they complete is quantised per channel, the rest waits."""
        r = torch.cat([self.residual, x.to(self.dtype)], dim=2)
        n = r.shape[2] // self.group * self.group
        if n:
            G, g0 = self.group, self.Tq // self.group
            if self.Tq + n > self.codes.shape[2]:
                grow = -(-(self.Tq + n + GROWTH) // G) * G
                self.codes = _grown(self.codes, self.Tq, grow)
                self.scale, self.zero = (_grown(t, g0, grow // G) for t in (self.scale, self.zero))
            # each channel of each group of G tokens is one quantisation group: codes (B, H, groups, D, 1, G)
            codes, scale, zero = _round(r[:, :, :n].unflatten(2, (-1, G)).transpose(-1, -2), G, self.bits)
            # stored token-major (B, H, n, D·bits/8), packed along channels as QuantTokens packs
            self.codes[:, :, self.Tq:self.Tq + n] = _pack(codes.squeeze(-2).transpose(-1, -2).flatten(2, 3), self.bits)
            self.scale[:, :, g0:g0 + n // G] = scale.squeeze(-1)
            self.zero[:, :, g0:g0 + n // G] = zero.squeeze(-1)
            self.Tq += n
        self.residual = r[:, :, n:].clone()

    def __getitem__(self, index) -> torch.Tensor:
        """Dequantised ``tensor[index]``: batch and head dims any index, the token dim an int or a unit-step slice."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError("QuantChannels indexes batch, head and token dims only")
        b, h, t = index + (slice(None),) * (3 - len(index))
        drop = [d for d, i in enumerate((b, h, t)) if isinstance(i, int)]
        b, h, t = (slice(i, i + 1 or None) if isinstance(i, int) else i for i in (b, h, t))
        lo, hi, step = t.indices(self.T)
        if step != 1:
            raise IndexError("QuantChannels reads unit-step token ranges only")
        hi = max(lo, hi)
        parts = []
        if lo < self.Tq:  # the groups overlapping [lo, min(hi, Tq)), dequantised, then cut to the range
            G, g0, g1 = self.group, lo // self.group, -(-min(hi, self.Tq) // self.group)
            codes = _unpack(self.codes[b, h, g0 * G:g1 * G], self.bits).unflatten(2, (-1, G)).to(self.dtype)
            x = torch.addcmul(self.zero[b, h, g0:g1, None], codes, self.scale[b, h, g0:g1, None]).flatten(2, 3)
            parts.append(x[:, :, lo - g0 * G:min(hi, self.Tq) - g0 * G])
        if hi > self.Tq:
            parts.append(self.residual[b, h, max(lo, self.Tq) - self.Tq:hi - self.Tq])
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2) if parts else self.residual[b, h, :0]
        for d in reversed(drop):
            out = out.squeeze(d)
        return out

    def crop(self, length: int) -> None:
        """Keep tokens [0, length); a cut inside a quantised group moves that group's kept tokens, dequantised, back
        to the residual (so a crop followed by the same tokens need not reproduce the first codes bit for bit)."""
        if length >= self.T:
            return
        if length >= self.Tq:
            self.residual = self.residual[:, :, :length - self.Tq]
            return
        keep = length // self.group * self.group
        self.residual = self[:, :, keep:length].contiguous()
        self.Tq = keep

    def map_batch(self, fn) -> None:
        G = self.group
        self.codes = fn(self.codes[:, :, :self.Tq]).contiguous()
        self.scale, self.zero = (fn(t[:, :, :self.Tq // G]).contiguous() for t in (self.scale, self.zero))
        self.residual = fn(self.residual).contiguous()

    def tensors(self) -> list[torch.Tensor]:
        G = self.group
        return [self.codes[:, :, :self.Tq], self.scale[:, :, :self.Tq // G], self.zero[:, :, :self.Tq // G],
                self.residual]

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero, self.residual))


def quantize(x: torch.Tensor, group: int, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., D) -> uint8 codes (..., D·bits/8), scale and zero (..., D // group): asymmetric round-to-nearest."""
    codes, scale, zero = _round(x, group, bits)
    return _pack(codes.flatten(-2), bits), scale, zero


def _round(x: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., D) -> one uint8 code per element (..., D // group, group), scale and zero (..., D // group)."""
    top = 2 ** bits - 1
    g = x.float().unflatten(-1, (-1, group))
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / top).clamp(min=torch.finfo(torch.float32).tiny)
    codes = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, top).to(torch.uint8)
    return codes, scale.to(x.dtype), lo.to(x.dtype)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """One code per byte -> ``bits``-bit packing along the last dim (at 4 bits: first half low nibble)."""
    if bits == 4:
        low, high = codes.chunk(2, dim=-1)
        codes = low | high << 4
    return codes


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.cat([codes & 15, codes >> 4], dim=-1) if bits == 4 else codes


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, dtype,
               bits: int = 8) -> torch.Tensor:
    """Inverse of :func:`quantize`: codes (..., D·bits/8) -> (..., D) in ``dtype``."""
    g = _unpack(codes, bits).unflatten(-1, (-1, group)).to(dtype)
    return torch.addcmul(zero[..., None], g, scale[..., None]).flatten(-2)


def _grown(t: torch.Tensor, held: int, size: int) -> torch.Tensor:
    out = t.new_empty(*t.shape[:2], size, t.shape[-1])
    out[:, :, :held] = t[:, :, :held]
    return out
