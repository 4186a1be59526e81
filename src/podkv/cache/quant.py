"""8-, 4- or 2-bit storage for the token-long tensors a :class:`~podkv.cache.PodCache` holds (issue 21: PoD composed
with quantized KV).

Each token's vector of each head is cut into groups of ``group`` channels, and each group is stored as
``bits``-bit codes with its own scale and zero in the model's dtype (asymmetric round-to-nearest over 2^bits − 1
steps: x ≈ code·scale + zero, error <= scale/2 = (max − min)/(2·(2^bits − 1)) of the group). That is
bits + 2·(dtype bits)/group bits per element: with groups of 64 in fp32, 9 at 8 bits, the layout of the ``kv8``
peer (transformers' QuantizedCache, HQQ backend, groups of 64 along the head dim), so the two compare at the
same bits; 5 at 4 bits, 3 at 2 bits. Why 4 bits too: KIVI (Liu et al. 2024) reports 4-bit per-token fake
quantization of both K and V close to fp16; its headline is 2 bits (keys per channel, values per token, the recent
tokens exact), which ``bits=2`` with ``key_quant="channel"`` and the proximal tokens kept reproduces. Below 8 bits
8/bits codes share a byte: channel slice j of D·bits/8 channels in bits [j·bits, (j+1)·bits), so packing is a
few slices and shifts, not an interleave.

Why not HQQ itself: its half-quadratic optimisation took 6.5 s per 4K-token tensor of SmolLM2 on our CPU
(60 such tensors per prefill), and at 8 bits it buys nothing measurable (the kv8 peer's NLL equals dense's to
1e-4); HQQ without the optimisation is this same round-to-nearest. Per-token groups quantise each token once,
when it arrives (or, with the proximal tokens kept exact, when it leaves the window), never again.

Reads dequantise only what is indexed: ``store[:, h0:h1, lo:hi]`` -> float tensor (B, h, hi − lo, D).

KIVI's layout for keys (``key_quant="channel"``, :class:`QuantChannels`): KIVI (Liu et al. 2024) found that keys
have outlier *channels* (fixed dims with large magnitude, RoPE or not) while values do not, so a per-token group
of key channels spends its range on the outlier and rounds the rest coarsely. Keys are then quantised per channel
over groups of ``group`` consecutive tokens; the tokens of a group that is not full yet wait in the model's dtype
(KIVI's residual), so the bits per element are the same as the per-token layout's once the group fills.

Measured on SmolLM2-135M at 4K (benchmarks/policies/pareto.md, held-out NLL gap to dense): 4-bit per-token +0.80%,
KIVI keys +0.68%, KIVI keys with the proximal tokens exact (``kv_keep_proximal``) +0.35%.
"""

from __future__ import annotations

import torch

from podkv.errors import PodError

GROWTH = 128  # tokens of spare room the buffers grow by (as PodCache's float buffers)
BITS = (8, 4, 2)  # code widths a store holds (a byte is 8/bits codes)
GROUP = 64  # channels per scale and zero (the kv8 peer's group), or the head dim when smaller


class QuantStore:
    """A (B, H, T, D) tensor that grows along T, read by indexing (dequantised where coded). Held in three parts:
    the first ``keep_first`` tokens in the model's dtype, then the coded tokens, then the tokens that wait in the
    model's dtype — the last ``keep_last`` (given at each append) and whatever the layout codes only in groups.

    Why keep some tokens exact: PoD's proximal tokens (the ``ns`` sinks and the last ``nr``) carry most of the
    attention mass, so their rounding error weighs most; KIVI keeps its recent tokens in full precision for the
    same reason (its residual). ``PodCache(kv_keep_proximal=True)`` sets ``keep_first = ns``, ``keep_last = nr + M``.
    """

    def __init__(self, like: torch.Tensor, group: int, bits: int = 8, keep_first: int = 0):
        check_bits(like.shape[-1], bits)
        self.group, self.bits, self.dtype, self.D, self.keep_first = group, bits, like.dtype, like.shape[-1], keep_first
        self.first = like[:, :, :0].clone()
        self.last = like[:, :, :0].clone()
        self.Tq = 0  # coded tokens

    @property
    def T(self) -> int:
        return self.first.shape[2] + self.Tq + self.last.shape[2]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.first.shape[:2], self.T, self.D))

    def append(self, x: torch.Tensor, keep_last: int = 0) -> None:
        """Add tokens x (B, H, C, D); code every waiting token the layout can, except the last ``keep_last``."""
        x = x.to(self.dtype)
        take = min(max(0, self.keep_first - self.first.shape[2]), x.shape[2])
        if take:
            self.first = torch.cat([self.first, x[:, :, :take]], dim=2)
        waiting = torch.cat([self.last, x[:, :, take:]], dim=2) if self.last.shape[2] else x[:, :, take:]
        n = self._codable(waiting.shape[2] - keep_last)
        if n > 0:
            self._code(waiting[:, :, :n])
        self.last = waiting[:, :, n:].clone()

    def __getitem__(self, index) -> torch.Tensor:
        """``tensor[index]`` (dequantised): batch and head dims any index, the token dim an int or a unit-step slice."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError(f"{type(self).__name__} indexes batch, head and token dims only")
        b, h, t = index + (slice(None),) * (3 - len(index))
        drop = [d for d, i in enumerate((b, h, t)) if isinstance(i, int)]
        b, h, t = (slice(i, i + 1 or None) if isinstance(i, int) else i for i in (b, h, t))
        lo, hi, step = t.indices(self.T)
        if step != 1:
            raise IndexError(f"{type(self).__name__} reads unit-step token ranges only")
        hi = max(lo, hi)
        F = self.first.shape[2]
        E = F + self.Tq
        parts = []
        if lo < F:
            parts.append(self.first[b, h, lo:min(hi, F)])
        if hi > F and lo < E:
            parts.append(self._decode(b, h, max(lo, F) - F, min(hi, E) - F))
        if hi > E:
            parts.append(self.last[b, h, max(lo, E) - E:hi - E])
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2) if parts else self.first[b, h, :0]
        for d in reversed(drop):
            out = out.squeeze(d)
        return out

    def crop(self, length: int) -> None:
        """Keep tokens [0, length). A cut inside the coded tokens keeps them coded (the layout may move a partly
        kept group back to the waiting tokens, as read), so tokens fed again need not be coded as before."""
        F = self.first.shape[2]
        if length >= self.T:
            return
        if length <= F:
            self.first, self.last = self.first[:, :, :length], self.last[:, :, :0]
            self._truncate(0)
        elif length <= F + self.Tq:
            self.last = self._truncate(length - F)
        else:
            self.last = self.last[:, :, :length - F - self.Tq]

    def map_batch(self, fn) -> None:
        """Apply a batch-dim edit (beam reorder, repeat, select) to the held rows."""
        self.first, self.last = fn(self.first).contiguous(), fn(self.last).contiguous()
        self._map_codes(fn)

    def tensors(self) -> list[torch.Tensor]:
        """What is held for the T tokens: the exact parts and the codes, scales and zeros."""
        return [self.first, *self._coded(), self.last]

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.first, self.last, *self._buffers()))

    # what a layout defines
    def _codable(self, n: int) -> int:
        """How many of the first ``n`` waiting tokens to code now."""
        raise NotImplementedError

    def _code(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _decode(self, b, h, a: int, z: int) -> torch.Tensor:
        """Coded tokens [a, z) of rows ``b`` and heads ``h`` (slices), dequantised."""
        raise NotImplementedError

    def _truncate(self, n: int) -> torch.Tensor:
        """Keep coded tokens [0, n): returns those that become waiting tokens again (dequantised)."""
        raise NotImplementedError

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scale, self.zero


def check_bits(D: int, bits: int) -> None:
    if bits not in BITS:
        raise PodError(f"PodCache field 'kv_bits' = {bits!r}: supported are {', '.join(map(str, BITS))}")
    if D % (8 // bits):
        raise PodError(f"PodCache field 'kv_bits' = {bits} packs {8 // bits} channels per byte: the head dim {D} "
                       f"must be a multiple of {8 // bits}")


class QuantTokens(QuantStore):
    """Coded per token: ``bits``-bit codes (uint8; two per byte at 4 bits) + a scale and zero per (token, head,
    group of ``group`` channels)."""

    def __init__(self, like: torch.Tensor, group: int, bits: int = 8, keep_first: int = 0):
        B, H, _, D = like.shape
        if D % group:
            raise PodError(f"PodCache field 'kv_group' = {group} must divide the head dim {D}")
        super().__init__(like, group, bits, keep_first)
        self.codes = torch.empty(B, H, GROWTH, D * bits // 8, dtype=torch.uint8, device=like.device)
        self.scale = torch.empty(B, H, GROWTH, D // group, dtype=like.dtype, device=like.device)
        self.zero = torch.empty_like(self.scale)

    def _codable(self, n: int) -> int:
        return max(0, n)

    def _code(self, x: torch.Tensor) -> None:
        C = x.shape[2]
        if self.Tq + C > self.codes.shape[2]:
            grow = self.Tq + C + GROWTH
            self.codes, self.scale, self.zero = (_grown(t, self.Tq, grow) for t in (self.codes, self.scale, self.zero))
        codes, scale, zero = quantize(x, self.group, self.bits)
        self.codes[:, :, self.Tq:self.Tq + C] = codes
        self.scale[:, :, self.Tq:self.Tq + C] = scale
        self.zero[:, :, self.Tq:self.Tq + C] = zero
        self.Tq += C

    def _decode(self, b, h, a: int, z: int) -> torch.Tensor:
        return dequantize(*(t[b, h, a:z] for t in (self.codes, self.scale, self.zero)), self.group, self.dtype,
                          self.bits)

    def _truncate(self, n: int) -> torch.Tensor:
        self.Tq = n
        return self.last[:, :, :0]

    def _map_codes(self, fn) -> None:
        self.codes, self.scale, self.zero = (fn(t[:, :, :self.Tq]).contiguous() for t in (self.codes, self.scale, self.zero))

    def _coded(self) -> list[torch.Tensor]:
        return [t[:, :, :self.Tq] for t in (self.codes, self.scale, self.zero)]


class QuantChannels(QuantStore):
    """KIVI's key layout: coded in groups of ``group`` tokens, with a scale and zero per (group, head, channel); the
    tokens of a group that is not full yet wait in the model's dtype."""

    def __init__(self, like: torch.Tensor, group: int, bits: int = 8, keep_first: int = 0):
        B, H, _, D = like.shape
        super().__init__(like, group, bits, keep_first)
        room = -(-GROWTH // group) * group
        self.codes = torch.empty(B, H, room, D * bits // 8, dtype=torch.uint8, device=like.device)
        self.scale = torch.empty(B, H, room // group, D, dtype=like.dtype, device=like.device)
        self.zero = torch.empty_like(self.scale)

    def _codable(self, n: int) -> int:
        return max(0, n) // self.group * self.group

    def _code(self, x: torch.Tensor) -> None:
        n, G, g0 = x.shape[2], self.group, self.Tq // self.group
        if self.Tq + n > self.codes.shape[2]:
            grow = -(-(self.Tq + n + GROWTH) // G) * G
            self.codes = _grown(self.codes, self.Tq, grow)
            self.scale, self.zero = (_grown(t, g0, grow // G) for t in (self.scale, self.zero))
        # each channel of each group of G tokens is one quantisation group: codes (B, H, groups, D, 1, G)
        codes, scale, zero = _round(x.unflatten(2, (-1, G)).transpose(-1, -2), G, self.bits)
        # stored token-major (B, H, n, D·bits/8), packed along channels as QuantTokens packs
        self.codes[:, :, self.Tq:self.Tq + n] = _pack(codes.squeeze(-2).transpose(-1, -2).flatten(2, 3), self.bits)
        self.scale[:, :, g0:g0 + n // G] = scale.squeeze(-1)
        self.zero[:, :, g0:g0 + n // G] = zero.squeeze(-1)
        self.Tq += n

    def _decode(self, b, h, a: int, z: int) -> torch.Tensor:
        """The groups overlapping [a, z), dequantised, then cut to the range."""
        G, g0, g1 = self.group, a // self.group, -(-z // self.group)
        codes = _unpack(self.codes[b, h, g0 * G:g1 * G], self.bits).unflatten(2, (-1, G)).to(self.dtype)
        x = torch.addcmul(self.zero[b, h, g0:g1, None], codes, self.scale[b, h, g0:g1, None]).flatten(2, 3)
        return x[:, :, a - g0 * G:z - g0 * G]

    def _truncate(self, n: int) -> torch.Tensor:
        keep = n // self.group * self.group
        back = self._decode(slice(None), slice(None), keep, n).contiguous()
        self.Tq = keep
        return back

    def _map_codes(self, fn) -> None:
        G = self.group
        self.codes = fn(self.codes[:, :, :self.Tq]).contiguous()
        self.scale, self.zero = (fn(t[:, :, :self.Tq // G]).contiguous() for t in (self.scale, self.zero))

    def _coded(self) -> list[torch.Tensor]:
        G = self.group
        return [self.codes[:, :, :self.Tq], self.scale[:, :, :self.Tq // G], self.zero[:, :, :self.Tq // G]]


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
    """One code per byte -> ``bits``-bit packing along the last dim: slice j of the 8/bits equal slices goes to
    bits [j·bits, (j+1)·bits) (at 4 bits: first half in the low nibble)."""
    if bits == 8:
        return codes
    parts = codes.chunk(8 // bits, dim=-1)
    out = parts[0].clone()
    for j, part in enumerate(parts[1:], 1):
        out |= part << (j * bits)
    return out


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    mask = (1 << bits) - 1
    return torch.cat([(codes >> (j * bits)) & mask for j in range(8 // bits)], dim=-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, dtype,
               bits: int = 8) -> torch.Tensor:
    """Inverse of :func:`quantize`: codes (..., D·bits/8) -> (..., D) in ``dtype``."""
    g = _unpack(codes, bits).unflatten(-1, (-1, group)).to(dtype)
    return torch.addcmul(zero[..., None], g, scale[..., None]).flatten(-2)


def _grown(t: torch.Tensor, held: int, size: int) -> torch.Tensor:
    out = t.new_empty(*t.shape[:2], size, t.shape[-1])
    out[:, :, :held] = t[:, :, :held]
    return out
