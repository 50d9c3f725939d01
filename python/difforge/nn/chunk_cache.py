"""The per-block key/value caches of a DiT for chunk-wise autoregressive sampling (Self-Forcing, CausVid).

A video is generated a chunk of latent frames at a time. Each denoising call of the current chunk attends, in every
block, to the cached keys/values of the clean earlier frames and bidirectionally within the chunk (block-causal).
Once the chunk is clean, one more call at t = 0 *commits* it: every block appends the chunk's keys/values to its
cache. The model reaches its caches through the layout (:attr:`SequenceLayout.kv_cache`): each block's
self-attention calls :meth:`ChunkKVCache.attend` once, in block order.

In a Skiparse layout (``dims=2``) every sub-sequence holds all frames of the chunk, frame after frame, so a block's
cache has one row per (sub-sequence, sample) and ``H'W'/G`` tokens per frame; H' and W' must then be multiples of
``P^2`` (no padding tokens inside a frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from difforge.nn.kvcache import SUPPORTED_BITS, QuantizedKVCache

KV_BITS = (*SUPPORTED_BITS, 16)  # 16: the unquantized cache (model dtype), the reference the others are measured by


def frame_tokens_per_row(layout, length: int, frames: int, device: torch.device) -> int:
    """Tokens of one frame in each ``length``-token row of ``layout``, which must hold whole frames one after
    another: raises for a Skiparse layout whose sub-sequences are padded."""
    seqlens = layout.seqlens(device)
    if length % frames or (seqlens is not None and bool((seqlens != length).any())):
        raise ValueError(
            f"chunk-wise / block-causal attention needs whole frames in every row: grid {layout.grid} gives rows of "
            f"{length} tokens for {frames} frames (in a Skiparse layout H' and W' must be multiples of P^2)"
        )
    return length // frames


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, *, frames: int, chunk_frames: int, layout) -> Tensor:
    """Attention of rows ``[rows, L, heads, D]`` holding ``frames`` frames one after another, where the tokens of
    each chunk of ``chunk_frames`` frames see their own chunk and the earlier ones (CausVid's block-causal mask):
    one attention call per chunk over its key prefix, differentiable. The schedule chunk-wise sampling follows."""
    from difforge.nn.skiparse import attend

    length = q.shape[1]
    per_chunk = frame_tokens_per_row(layout, length, frames, q.device) * chunk_frames
    outs = [attend(q[:, start : start + per_chunk], k[:, : start + per_chunk], v[:, : start + per_chunk],
                   backend=layout.backend) for start in range(0, length, per_chunk)]  # fmt: skip
    return torch.cat(outs, 1)


class FrameCache(Protocol):
    tokens_per_frame: int

    def append(self, k: Tensor, v: Tensor) -> None: ...

    def attention(self, q: Tensor, k_cur: Tensor, v_cur: Tensor) -> Tensor: ...


class DenseKVCache:
    """Unquantized keys/values of the committed frames, in the model dtype: the cache every quantized one is
    compared with. It holds at most ``max_frames`` frames: the first ``sink_frames`` and the most recent others
    (the same frames a :class:`QuantizedKVCache` of that capacity keeps). ``attention`` is one softmax over
    ``[cached ; current chunk]``."""

    def __init__(self, *, tokens_per_frame: int, sink_frames: int = 0, max_frames: int | None = None,
                 backend: str = "difforge") -> None:  # fmt: skip
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.tokens_per_frame, self.backend = tokens_per_frame, backend
        self.sink_frames, self.max_frames = sink_frames, max_frames

    def append(self, k: Tensor, v: Tensor) -> None:
        self.k = k.clone() if self.k is None else torch.cat([self.k, k], 1)
        self.v = v.clone() if self.v is None else torch.cat([self.v, v], 1)
        if self.max_frames is not None and self.num_frames > self.max_frames:  # evict the oldest non-sink frames
            sink = self.sink_frames * self.tokens_per_frame
            keep = (self.max_frames - self.sink_frames) * self.tokens_per_frame
            self.k = torch.cat([self.k[:, :sink], self.k[:, self.k.shape[1] - keep :]], 1)
            self.v = torch.cat([self.v[:, :sink], self.v[:, self.v.shape[1] - keep :]], 1)

    def attention(self, q: Tensor, k_cur: Tensor, v_cur: Tensor) -> Tensor:
        from difforge.nn.skiparse import attend

        if self.k is None:
            return attend(q, k_cur, v_cur, backend=self.backend)
        return attend(q, torch.cat([self.k, k_cur], 1), torch.cat([self.v, v_cur], 1), backend=self.backend)

    @property
    def num_frames(self) -> int:
        return 0 if self.k is None else self.k.shape[1] // self.tokens_per_frame


@dataclass(frozen=True)
class CacheSpec:
    """How to build each block's cache. ``bits=16``: :class:`DenseKVCache`; 2/4/8: :class:`QuantizedKVCache` with
    ``sink_frames`` unquantized first frames, a window of ``recent_frames`` unquantized recent frames and every
    older frame quantized once, at most ``max_frames`` frames in all (beyond, the oldest non-sink frames are
    evicted: a rolling cache for long videos; the unquantized cache keeps the same frames), Jensen correction
    ``jensen`` on the quantized keys. ``group_size`` is capped at the head dim."""

    bits: int = 16
    jensen: str = "taylor2"
    sink_frames: int = 1
    recent_frames: int = 1
    max_frames: int = 64
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.max_frames < self.sink_frames + self.recent_frames + 1:
            raise ValueError(
                f"the cache must hold more than its {self.sink_frames} sink + {self.recent_frames} recent frames, got "
                f"max_frames={self.max_frames}"
            )
        if self.bits not in KV_BITS:
            raise ValueError(f"KV cache bits must be one of {KV_BITS}, got {self.bits!r}")
        from difforge.ops.kvcache import JENSEN_MODES

        if self.jensen not in JENSEN_MODES:
            raise ValueError(f"jensen must be one of {JENSEN_MODES}, got {self.jensen!r}")

    def build(self, rows: int, heads: int, head_dim: int, tokens_per_frame: int, dtype: torch.dtype,
              device: torch.device, backend: str) -> FrameCache:  # fmt: skip
        if self.bits == 16:
            return DenseKVCache(tokens_per_frame=tokens_per_frame, sink_frames=self.sink_frames,
                                max_frames=self.max_frames, backend=backend)  # fmt: skip
        return QuantizedKVCache(
            batch=rows, heads_kv=heads, head_dim=head_dim, tokens_per_frame=tokens_per_frame,
            sink_frames=self.sink_frames, recent_frames=self.recent_frames,
            max_quantized_frames=self.max_frames - self.sink_frames - self.recent_frames,
            bits=self.bits, group_size=min(self.group_size, head_dim), dtype=dtype, device=device, jensen=self.jensen,
        )  # fmt: skip


class ChunkKVCache:
    """One cache per self-attention block, created at the first chunk from the shapes the block sees.

    Call :meth:`begin` before each model call over a chunk (``frames`` token frames; ``commit`` when the chunk is
    clean and its keys/values should be kept). The model's blocks then call :meth:`attend` in order.
    """

    def __init__(self, spec: CacheSpec | None = None) -> None:
        self.spec = spec or CacheSpec()
        self.caches: list[FrameCache] = []
        self._cursor, self._commit, self._frames = 0, False, 0

    def begin(self, *, frames: int, commit: bool) -> None:
        if self._cursor not in (0, len(self.caches)):
            raise RuntimeError(f"ChunkKVCache: the previous call visited {self._cursor} of {len(self.caches)} blocks")
        self._cursor, self._commit, self._frames = 0, commit, frames

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout) -> Tensor:
        """Attention of the current chunk (``[rows, L, heads, head_dim]`` in ``layout``) over the block's cache and
        itself; on a commit call the chunk's keys/values are appended afterwards."""
        rows, length, heads, head_dim = k.shape
        per_frame = frame_tokens_per_row(layout, length, self._frames, k.device)
        if self._cursor == len(self.caches):
            self.caches.append(self.spec.build(rows, heads, head_dim, per_frame, k.dtype, k.device, layout.backend))
        cache = self.caches[self._cursor]
        self._cursor += 1
        out = cache.attention(q, k, v)
        if self._commit:
            cache.append(k, v)
        return out

    def memory(self) -> dict[str, int]:
        """Bytes of the committed frames: ``stored`` as held (unquantized frames counted at 2 bytes per element,
        as bf16) and ``bf16`` if every frame were held in bf16, summed over blocks, keys and values."""
        stored = bf16 = 0
        for cache in self.caches:
            if isinstance(cache, DenseKVCache):
                elements = 0 if cache.k is None else 2 * cache.k.numel()
                stored, bf16 = stored + 2 * elements, bf16 + 2 * elements
                continue
            ids = cache.frame_ids()
            frame = 2 * cache.batch * cache.tokens_per_frame * cache.heads_kv * cache.head_dim * 2
            quantized = cache.quantized_nbytes // cache.max_quantized_frames
            stored += (len(ids.sink) + len(ids.window)) * frame + len(ids.quantized) * quantized
            bf16 += sum(map(len, ids)) * frame
        return {"stored": stored, "bf16": bf16}

