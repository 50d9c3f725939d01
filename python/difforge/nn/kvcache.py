"""A quantized key/value cache for chunk-wise autoregressive video diffusion (Self-Forcing, CausVid, LongLive).

Spec: ``kv_cache_jensen.md`` (§1 cache structure, §2.4 layout, §5 invariant 8 "quantize once").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from difforge.ops import kvcache as kv_ops

OVERFLOW_MODES = ("evict", "error")
SUPPORTED_BITS = (2, 4, 8)
CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FrameLayout(NamedTuple):
    """Which committed frames the cache holds, by region, each oldest first (frame ids count commits from 0)."""

    sink: tuple[int, ...]
    window: tuple[int, ...]
    quantized: tuple[int, ...]


class QuantizedKVCache:
    """Keys and values of the committed (clean) frames of one attention layer, for chunk-wise AR sampling.

    Three regions, filled in this order by :meth:`append` (one frame = ``tokens_per_frame`` tokens):

    * **sink**: the first ``sink_frames`` committed frames, kept unquantized in ``dtype`` (bf16), never
      evicted and never biased: video sinks are content anchors (spec §1).
    * **window**: the ``recent_frames`` most recent committed frames after the sinks, unquantized, a ring
      of frame slots. A frame that leaves it is quantized **once** with :func:`difforge.ops.kv_quantize`
      (token-axis groups of ``group_size`` channels) into the quantized region. ``recent_frames=0``
      quantizes at commit.
    * **quantized**: a ring of ``max_quantized_frames`` frame slots of packed codes plus per-group step and
      zero (``meta_dtype``). Slots are filled in commit order from slot 0, so the filled part is always a
      prefix of the buffers. Codes are written once and never re-quantized (spec §5 invariant 8). When the
      ring is full, ``overflow="evict"`` overwrites the oldest quantized frame; ``overflow="error"`` raises.

    :meth:`attention` runs :func:`difforge.ops.quantized_kv_attention` of the current chunk over
    ``[quantized ; sink + window ; current chunk]`` in one softmax. The kernel dequantizes the cached
    tiles itself and subtracts the Jensen bias (``jensen``, ``jensen_lambda``) from the logits of the
    quantized keys only; sink, window and current keys are never biased, values are never corrected. The
    filled prefixes of the buffers are passed as views: no concatenation, no dequantized copy.

    ``rotate=True`` (QuaRot) stores every key as ``hadamard_rotate(k)`` (all regions, so that one rotated
    query serves them all); :meth:`attention` rotates ``q`` and ``k_cur`` alike, so ``q' . k' = q . k``,
    and the bias uses the rotated query. Values are not rotated.

    Storage is allocated once, in the constructor (:attr:`nbytes`); appends copy into it. The cache is a
    plain object, not an ``nn.Module``: ``Module.to(dtype)`` would cast its step and zero buffers.

    Shapes: keys and values are ``[batch, L, heads_kv, head_dim]``; queries ``[batch, Lq, Hq, head_dim]``
    with ``heads_kv`` dividing ``Hq`` (grouped-query attention).
    """

    def __init__(
        self,
        *,
        batch: int,
        heads_kv: int,
        head_dim: int,
        tokens_per_frame: int,
        sink_frames: int = 0,
        recent_frames: int = 0,
        max_quantized_frames: int,
        overflow: str = "evict",
        bits: int = 2,
        group_size: int = 32,
        meta_dtype: torch.dtype = torch.float16,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        rotate: bool = False,
        jensen: str = "taylor2",
        jensen_lambda: float = 1.0,
    ) -> None:
        for name, value, least in (
            ("batch", batch, 1),
            ("heads_kv", heads_kv, 1),
            ("head_dim", head_dim, 1),
            ("tokens_per_frame", tokens_per_frame, 1),
            ("sink_frames", sink_frames, 0),
            ("recent_frames", recent_frames, 0),
            ("max_quantized_frames", max_quantized_frames, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"QuantizedKVCache: {name} must be an int >= {least}, got {value!r}")
        if overflow not in OVERFLOW_MODES:
            raise ValueError(f"QuantizedKVCache: overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantizedKVCache: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"QuantizedKVCache: group_size must be a positive int, got {group_size!r}")
        if head_dim % group_size:
            raise ValueError(f"QuantizedKVCache: group_size ({group_size}) must divide head_dim ({head_dim})")
        if head_dim * bits % 8:
            raise ValueError(f"QuantizedKVCache: head_dim * bits must be a multiple of 8, got {head_dim} * {bits}")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"QuantizedKVCache: dtype must be one of {CACHE_DTYPES}, got {dtype}")
        if meta_dtype not in CACHE_DTYPES:
            raise ValueError(f"QuantizedKVCache: meta_dtype must be one of {CACHE_DTYPES}, got {meta_dtype}")
        if jensen not in kv_ops.JENSEN_MODES:
            raise ValueError(f"QuantizedKVCache: jensen must be one of {kv_ops.JENSEN_MODES}, got {jensen!r}")
        if rotate and head_dim & (head_dim - 1):
            raise ValueError(f"QuantizedKVCache: rotate=True needs a power-of-two head_dim, got {head_dim}")

        self.batch, self.heads_kv, self.head_dim = batch, heads_kv, head_dim
        self.tokens_per_frame = tokens_per_frame
        self.sink_frames, self.recent_frames = sink_frames, recent_frames
        self.max_quantized_frames, self.overflow = max_quantized_frames, overflow
        self.bits, self.group_size, self.meta_dtype, self.dtype = bits, group_size, meta_dtype, dtype
        self.rotate, self.jensen, self.jensen_lambda = rotate, jensen, float(jensen_lambda)
        self.device = torch.empty(0, device=device).device  # canonical ("cuda" -> "cuda:0")

        dense_tokens = (sink_frames + recent_frames) * tokens_per_frame
        ring_tokens = max_quantized_frames * tokens_per_frame
        groups, packed = head_dim // group_size, head_dim * bits // 8

        def empty(tokens: int, last: int, dt: torch.dtype) -> Tensor:
            return torch.empty((batch, tokens, heads_kv, last), dtype=dt, device=self.device)

        # Unquantized sink frames (slots [0, sink_frames)) then the recent window (a ring of recent_frames slots).
        self.k_dense, self.v_dense = empty(dense_tokens, head_dim, dtype), empty(dense_tokens, head_dim, dtype)
        # The quantized ring: token-axis groups, as kv_quantize returns them.
        self.k_codes, self.v_codes = empty(ring_tokens, packed, torch.uint8), empty(ring_tokens, packed, torch.uint8)
        self.k_step, self.k_zero = empty(ring_tokens, groups, meta_dtype), empty(ring_tokens, groups, meta_dtype)
        self.v_step, self.v_zero = empty(ring_tokens, groups, meta_dtype), empty(ring_tokens, groups, meta_dtype)
        self._num_frames = 0

    # ---- layout: everything follows from the number of committed frames ----

    @property
    def num_frames(self) -> int:
        """Frames committed since construction (or :meth:`reset`), evicted ones included."""
        return self._num_frames

    def _window_start(self, committed: int) -> int:
        """Id of the oldest frame in the window once ``committed`` frames are committed."""
        return max(self.sink_frames, committed - self.recent_frames)

    def _quantized_range(self, committed: int) -> range:
        """Ids in the quantized ring once ``committed`` frames are committed, oldest first."""
        end = self._window_start(committed)
        return range(max(self.sink_frames, end - self.max_quantized_frames), end)

    def _quantized_slot(self, frame_id: int) -> int:
        return (frame_id - self.sink_frames) % self.max_quantized_frames  # the first to enter is frame sink_frames

    def _dense_slot(self, frame_id: int) -> int:
        if frame_id < self.sink_frames:
            return frame_id
        return self.sink_frames + (frame_id - self.sink_frames) % self.recent_frames

    def frame_ids(self) -> FrameLayout:
        """The ids of the frames in the sink, the window and the quantized ring, each oldest first."""
        n = self._num_frames
        window = range(self._window_start(n), n) if n > self.sink_frames else range(0)
        return FrameLayout(tuple(range(min(n, self.sink_frames))), tuple(window), tuple(self._quantized_range(n)))

    def locate(self, frame_id: int) -> tuple[str, slice] | None:
        """``(region, tokens)`` of a committed frame: region ``"dense"`` (sink or window, in
        ``k_dense``/``v_dense``) or ``"quantized"`` (``k_codes``, ``k_step``, ... of the ring), and the
        slice of that region's token axis holding it; None if the frame was evicted or never committed."""
        layout = self.frame_ids()
        if frame_id in layout.sink or frame_id in layout.window:
            region, slot = "dense", self._dense_slot(frame_id)
        elif frame_id in layout.quantized:
            region, slot = "quantized", self._quantized_slot(frame_id)
        else:
            return None
        tpf = self.tokens_per_frame
        return region, slice(slot * tpf, (slot + 1) * tpf)

    # ---- memory ----

    def _frame_bytes(self) -> tuple[int, int]:
        """(bytes of one unquantized frame of K and V, bytes of one quantized frame of K and V)."""
        tokens = self.batch * self.tokens_per_frame * self.heads_kv
        dense = 2 * tokens * self.head_dim * self.dtype.itemsize
        groups = self.head_dim // self.group_size
        quantized = 2 * tokens * (self.head_dim * self.bits // 8 + 2 * groups * self.meta_dtype.itemsize)
        return dense, quantized

    def _buffers(self) -> tuple[Tensor, ...]:
        return (self.k_dense, self.v_dense, self.k_codes, self.k_step, self.k_zero,
                self.v_codes, self.v_step, self.v_zero)  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the cache storage (unquantized sink and window, quantized ring, K and V)."""
        return sum(t.numel() * t.element_size() for t in self._buffers())

    @property
    def quantized_nbytes(self) -> int:
        """Bytes allocated for the quantized ring: codes, step and zero of K and V."""
        return self.max_quantized_frames * self._frame_bytes()[1]

    @property
    def bf16_nbytes(self) -> int:
        """Bytes the same capacity (sink + window + quantized frames) would take unquantized, K and V, in the
        cache ``dtype`` (bf16 by default)."""
        frames = self.sink_frames + self.recent_frames + self.max_quantized_frames
        return frames * self._frame_bytes()[0]

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the frames held now (the filled part of the storage)."""
        layout = self.frame_ids()
        dense, quantized = self._frame_bytes()
        return (len(layout.sink) + len(layout.window)) * dense + len(layout.quantized) * quantized

    @property
    def bf16_stored_nbytes(self) -> int:
        """Bytes the frames held now would take unquantized (cache ``dtype``)."""
        return sum(map(len, self.frame_ids())) * self._frame_bytes()[0]

    @property
    def effective_bits(self) -> float:
        """Stored bits per element of the quantized region: ``bits + 2 * meta_bits / group_size``
        (3.0 at INT2, g = 32, fp16 step and zero)."""
        return kv_ops.effective_bits(self.bits, self.group_size, self.meta_dtype)

    # ---- commit and attend ----

    def reset(self) -> None:
        """Forget every frame (a new video); the storage is kept."""
        self._num_frames = 0

    def _check(self, where: str, name: str, t: object, tokens_multiple: int = 1, heads: int | None = None) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"QuantizedKVCache.{where}: {name} must be a Tensor, got {type(t).__name__}")
        heads = self.heads_kv if heads is None else heads
        expected = f"[{self.batch}, L, {heads}, {self.head_dim}]"
        if t.dim() != 4 or t.shape[0] != self.batch or t.shape[2] != heads or t.shape[3] != self.head_dim:
            raise ValueError(f"QuantizedKVCache.{where}: {name} must have shape {expected}, got {list(t.shape)}")
        if t.shape[1] % tokens_multiple:
            raise ValueError(
                f"QuantizedKVCache.{where}: {name} must hold whole frames: its length {t.shape[1]} is not a "
                f"multiple of tokens_per_frame={tokens_multiple}"
            )
        if t.dtype != self.dtype:
            raise TypeError(f"QuantizedKVCache.{where}: {name} must be {self.dtype} (the cache dtype), got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"QuantizedKVCache.{where}: {name} is on {t.device}, the cache on {self.device}")

    def append(self, k: Tensor, v: Tensor) -> None:
        """Commit a chunk of clean frames: ``k``, ``v`` ``[batch, n_frames * tokens_per_frame, heads_kv,
        head_dim]`` in the cache dtype and device (the keys as the model computes them; rotated here when
        ``rotate``). Frames flow sink -> window -> quantized ring; frames leaving the window are quantized
        here, once. With ``overflow="error"`` a chunk that would overflow the ring raises and changes nothing.
        """
        tpf = self.tokens_per_frame
        self._check("append", "k", k, tpf)
        self._check("append", "v", v, tpf)
        if k.shape != v.shape:
            raise ValueError(f"QuantizedKVCache.append: k and v shapes differ: {list(k.shape)} vs {list(v.shape)}")
        n = k.shape[1] // tpf
        if n == 0:
            raise ValueError("QuantizedKVCache.append: k and v hold no frame (length 0)")
        before, after = self._num_frames, self._num_frames + n
        entering = self._quantized_range(after)
        needed = self._window_start(after) - self.sink_frames
        if self.overflow == "error" and needed > self.max_quantized_frames:
            raise RuntimeError(
                f"QuantizedKVCache.append: the quantized region is full (max_quantized_frames="
                f"{self.max_quantized_frames}): committing {n} more frame(s) would need {needed} quantized frames; "
                "use overflow='evict' or a larger max_quantized_frames"
            )
        if self.rotate:
            k = kv_ops.hadamard_rotate(k)

        def frame(t: Tensor, dense: Tensor, frame_id: int) -> Tensor:
            """Frame ``frame_id``'s tokens: from the window if committed before, else from the new chunk."""
            if frame_id < before:
                slot = self._dense_slot(frame_id)
                return dense[:, slot * tpf : (slot + 1) * tpf]
            return t[:, (frame_id - before) * tpf : (frame_id - before + 1) * tpf]

        # 1. Frames that enter the ring now (the window frames they displace are read before being overwritten).
        #    Ids already in the ring before this append are left alone: quantize once.
        new_ids = [f for f in entering if f not in self._quantized_range(before)]
        if new_ids:
            self._quantize_into_ring(
                new_ids,
                torch.cat([frame(k, self.k_dense, f) for f in new_ids], 1),
                torch.cat([frame(v, self.v_dense, f) for f in new_ids], 1),
            )
        # 2. New frames that stay unquantized: the sinks, then the window.
        for f in range(before, after):
            if f < self.sink_frames or f >= self._window_start(after):
                slot = self._dense_slot(f)
                self.k_dense[:, slot * tpf : (slot + 1) * tpf].copy_(frame(k, self.k_dense, f))
                self.v_dense[:, slot * tpf : (slot + 1) * tpf].copy_(frame(v, self.v_dense, f))
        self._num_frames = after

    def _quantize_into_ring(self, frame_ids: list[int], k: Tensor, v: Tensor) -> None:
        tpf = self.tokens_per_frame
        options = {"bits": self.bits, "group_size": self.group_size, "axis": "token", "meta_dtype": self.meta_dtype}
        for t, codes_buf, step_buf, zero_buf in ((k, self.k_codes, self.k_step, self.k_zero),
                                                 (v, self.v_codes, self.v_step, self.v_zero)):  # fmt: skip
            codes, step, zero = kv_ops.kv_quantize(t, **options)
            for i, f in enumerate(frame_ids):
                slot = self._quantized_slot(f)
                src, dst = slice(i * tpf, (i + 1) * tpf), slice(slot * tpf, (slot + 1) * tpf)
                codes_buf[:, dst].copy_(codes[:, src])
                step_buf[:, dst].copy_(step[:, src])
                zero_buf[:, dst].copy_(zero[:, src])

    def attention(
        self,
        q: Tensor,
        k_cur: Tensor,
        v_cur: Tensor,
        *,
        scale: float | None = None,
        jensen: str | None = None,
        jensen_lambda: float | None = None,
    ) -> Tensor:
        """Attention of the current chunk's queries over the cached frames and the current chunk itself.

        Args:
            q: ``[batch, Lq, Hq, head_dim]`` in the cache dtype (``heads_kv`` divides ``Hq``).
            k_cur, v_cur: the current chunk ``[batch, Lcur, heads_kv, head_dim]`` (any length), unrotated.
            scale: softmax scale, ``1/sqrt(head_dim)`` when None; the Jensen bias uses it too.
            jensen, jensen_lambda: override the cache's bias mode and multiplier for this call.

        Returns:
            ``[batch, Lq, Hq, head_dim]`` in the cache dtype. Not differentiable (an inference cache).
        """
        if not isinstance(q, Tensor) or q.dim() != 4 or q.shape[2] < 1 or q.shape[2] % self.heads_kv:
            shape = list(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(
                f"QuantizedKVCache.attention: q must be [{self.batch}, Lq, Hq, {self.head_dim}] with heads_kv="
                f"{self.heads_kv} dividing Hq, got {shape}"
            )
        self._check("attention", "q", q, heads=q.shape[2])
        self._check("attention", "k_cur", k_cur)
        self._check("attention", "v_cur", v_cur)
        if k_cur.shape != v_cur.shape:
            raise ValueError(
                f"QuantizedKVCache.attention: k_cur and v_cur shapes differ: {list(k_cur.shape)} vs "
                f"{list(v_cur.shape)}"
            )
        if self.rotate:
            q, k_cur = kv_ops.hadamard_rotate(q), kv_ops.hadamard_rotate(k_cur)
        layout = self.frame_ids()
        tpf = self.tokens_per_frame
        ring = slice(0, len(layout.quantized) * tpf)  # filled slots are a prefix
        dense = (len(layout.sink) + len(layout.window)) * tpf
        return kv_ops.quantized_kv_attention(
            q, k_cur, v_cur,
            self.k_codes[:, ring], self.k_step[:, ring], self.k_zero[:, ring],
            self.v_codes[:, ring], self.v_step[:, ring], self.v_zero[:, ring],
            bits=self.bits,
            group_size=self.group_size,
            k_sink=self.k_dense[:, :dense] if dense else None,
            v_sink=self.v_dense[:, :dense] if dense else None,
            scale=scale,
            jensen=self.jensen if jensen is None else jensen,
            jensen_lambda=self.jensen_lambda if jensen_lambda is None else jensen_lambda,
        )  # fmt: skip

    def __repr__(self) -> str:
        layout = self.frame_ids()
        return (
            f"QuantizedKVCache(batch={self.batch}, heads_kv={self.heads_kv}, head_dim={self.head_dim}, "
            f"tokens_per_frame={self.tokens_per_frame}, sink_frames={self.sink_frames}, "
            f"recent_frames={self.recent_frames}, max_quantized_frames={self.max_quantized_frames}, "
            f"bits={self.bits}, group_size={self.group_size}, rotate={self.rotate}, jensen={self.jensen!r}; "
            f"{self._num_frames} committed: {len(layout.sink)} sink, {len(layout.window)} window, "
            f"{len(layout.quantized)} quantized)"
        )
