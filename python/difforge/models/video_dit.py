"""A Wan-style video diffusion transformer on difforge's fused norms, flash / Skiparse attention and SSP.

Latents ``[B, C, T, H, W]`` are cut into ``(pt, ph, pw)`` patches (token order t, h, w with w fastest), embedded,
run through :class:`~difforge.nn.HybridDiTBlock` s (full or OSP-Next's hybrid ``dual_end`` Skiparse schedule) and
projected back. The timestep (per sample ``[B]``, or per latent frame ``[B, T/pt]``) becomes a ``6 * dim``
modulation. The model predicts the flow-matching velocity; it knows nothing about the sampler.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from difforge.nn.chunk_cache import ChunkKVCache
from difforge.nn.dit_block import FrameModulation, HybridDiTBlock, ModulatedNorm, PendingResidual
from difforge.nn.rope import rope_angles_3d
from difforge.nn.skiparse import Kind, SequenceLayout, SkiparseLayout, dual_end_schedule


@dataclass(frozen=True)
class VideoDiTConfig:
    """Architecture of a :class:`VideoDiT`. ``attention="hybrid"`` uses the ``dual_end`` schedule with
    ``full_blocks`` dense blocks at the ends and Skiparse blocks (sparse ratio P, ``sparse_dims`` 2 or 1) between.
    ``fused_norm=False`` and ``backend="sdpa"`` select the plain-PyTorch baselines. ``causal_chunk > 0`` makes
    self-attention block-causal over chunks of that many token frames (a chunk sees itself and earlier chunks):
    the model chunk-wise autoregressive sampling assumes (:meth:`VideoDiT.forward_chunk`)."""

    in_channels: int = 4
    patch: tuple[int, int, int] = (1, 2, 2)
    dim: int = 64
    depth: int = 6
    num_heads: int = 4
    ffn_dim: int = 256
    context_dim: int = 32
    freq_dim: int = 256
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    attention: Literal["full", "hybrid"] = "full"
    sparse_ratio: int = 2
    full_blocks: int = 4
    sparse_dims: int = 2
    fused_norm: bool = True
    backend: Literal["difforge", "sdpa"] = "difforge"
    out_channels: int | None = None
    causal_chunk: int = 0  # > 0: block-causal over chunks of this many token frames (chunk-wise AR models)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"VideoDiTConfig: {name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("in_channels", "dim", "depth", "num_heads", "ffn_dim", "context_dim", "freq_dim"):
            if int(getattr(self, name)) < 1:
                raise bad(name, ">= 1")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise bad("patch", "three positive ints (pt, ph, pw)")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise bad("num_heads", f"a divisor of dim = {self.dim} leaving an even head dim")
        if self.freq_dim % 2:
            raise bad("freq_dim", "even")
        if isinstance(self.causal_chunk, bool) or not isinstance(self.causal_chunk, int) or self.causal_chunk < 0:
            raise bad("causal_chunk", "an int >= 0 (0: bidirectional)")
        if self.attention not in ("full", "hybrid"):
            raise bad("attention", '"full" or "hybrid"')
        if self.backend not in ("difforge", "sdpa"):
            raise bad("backend", '"difforge" or "sdpa"')
        if self.attention == "hybrid":
            if self.sparse_ratio < 2:
                raise bad("sparse_ratio", ">= 2 for hybrid attention")
            if self.sparse_dims not in (1, 2):
                raise bad("sparse_dims", "1 or 2")
            dual_end_schedule(self.depth, self.full_blocks)  # raises on a bad full_blocks
        object.__setattr__(self, "patch", tuple(int(p) for p in self.patch))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    def schedule(self) -> list[Kind]:
        """Layout kind of each block."""
        if self.attention == "full":
            return ["full"] * self.depth
        return dual_end_schedule(self.depth, self.full_blocks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoDiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VideoDiTConfig: unknown fields {unknown}")
        return cls(**{**d, "patch": tuple(d.get("patch", cls.patch))})


CONFIGS: dict[str, VideoDiTConfig] = {
    # Trains on 2 CPU cores in minutes on the synthetic shapes (about 0.35 M parameters).
    "tiny": VideoDiTConfig(),
    "small": VideoDiTConfig(dim=256, depth=8, num_heads=4, ffn_dim=1024, context_dim=64),
    "mid": VideoDiTConfig(in_channels=16, dim=768, depth=12, num_heads=12, ffn_dim=3072, context_dim=512),
    # Wan2.1-T2V-1.3B's sizes (umT5 text features of width 4096).
    "wan-1.3b": VideoDiTConfig(
        in_channels=16, dim=1536, depth=30, num_heads=12, ffn_dim=8960, context_dim=4096, cross_attn_norm=True
    ),
}


def video_dit_config(name: str, **overrides: Any) -> VideoDiTConfig:
    """A named config (``tiny``, ``small``, ``mid``, ``wan-1.3b``) with field overrides."""
    if name not in CONFIGS:
        raise ValueError(f"unknown VideoDiT config {name!r}; known: {', '.join(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Wan's timestep features: ``[cos(t * f_i), sin(t * f_i)]``, f_i = 10000^(-i/(dim/2)), in float32."""
    freqs = torch.pow(10000.0, -torch.arange(dim // 2, device=t.device, dtype=torch.float64) / (dim // 2))
    angles = torch.outer(t.reshape(-1).double(), freqs)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float().reshape(*t.shape, dim)


def _flush(x: Tensor, residual: PendingResidual | None) -> Tensor:
    return x if residual is None else residual.apply(x)


class VideoDiT(nn.Module):
    """Wan-style DiT predicting a velocity for latents ``[B, C, T, H, W]``.

    ``forward(latents, t, context, group=None) -> [B, C_out, T, H, W]``:

    * ``t``: float ``[B]`` (one time per sample) or ``[B, T/pt]`` (per latent frame), in [0, 1];
    * ``context``: ``[B, Lc, context_dim]`` condition tokens;
    * ``group``: a process group for sequence parallelism; every rank passes the same inputs and the sequence
      is sharded inside (Ulysses for full blocks, SSP for Skiparse blocks). The output is gathered.

    :meth:`forward_tokens` returns this rank's shard of output tokens ``[B, N/S, pt*ph*pw*C_out]`` without the
    gather (training computes the loss on shards); :meth:`patchify` / :meth:`unpatchify` convert.
    """

    def __init__(self, config: VideoDiTConfig | str = "tiny") -> None:
        super().__init__()
        config = video_dit_config(config) if isinstance(config, str) else config
        self.config = c = config
        patch_volume = math.prod(c.patch)
        self.patch_embedding = nn.Linear(patch_volume * c.in_channels, c.dim)
        self.text_embedding = nn.Sequential(
            nn.Linear(c.context_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(
            HybridDiTBlock(
                c.dim, c.num_heads, c.ffn_dim, qk_norm=c.qk_norm, cross_attn_norm=c.cross_attn_norm, eps=c.eps,
                fused_norm=c.fused_norm, backend=c.backend,
            )  # fmt: skip
            for _ in range(c.depth)
        )
        self.head_norm = ModulatedNorm(c.dim, eps=c.eps, fused=c.fused_norm)
        self.head_modulation = nn.Parameter(torch.randn(2, c.dim) / c.dim**0.5)
        self.head = nn.Linear(c.dim, patch_volume * c.output_channels)
        # Zero output head: the untrained model predicts velocity 0 (DiT's adaLN-zero idea at the output).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.schedule = c.schedule()
        self._angles: dict[tuple, Tensor] = {}

    # ---- patches ----

    def grid(self, latents_shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """Token grid (T/pt, H/ph, W/pw) of latents ``[B, C, T, H, W]``; raises when a patch does not divide."""
        if len(latents_shape) != 5 or latents_shape[1] != self.config.in_channels:
            raise ValueError(
                f"VideoDiT: latents must be [B, C={self.config.in_channels}, T, H, W], got {tuple(latents_shape)}"
            )
        T, H, W = latents_shape[2:]
        pt, ph, pw = self.config.patch
        if T % pt or H % ph or W % pw or min(T, H, W) < 1:
            raise ValueError(
                f"VideoDiT: latent (T, H, W) = {(T, H, W)} must be positive multiples of the patch {(pt, ph, pw)}"
            )
        return T // pt, H // ph, W // pw

    def patchify(self, latents: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` -> ``[B, N, pt*ph*pw*C]`` tokens in (t, h, w) order."""
        (B, C), (T, H, W), (pt, ph, pw) = latents.shape[:2], self.grid(latents.shape), self.config.patch
        x = latents.reshape(B, C, T, pt, H, ph, W, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(B, T * H * W, pt * ph * pw * C)

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """``[B, N, pt*ph*pw*C]`` -> ``[B, C, T*pt, H*ph, W*pw]``."""
        (T, H, W), (pt, ph, pw) = grid, self.config.patch
        B, C = tokens.shape[0], tokens.shape[-1] // (pt * ph * pw)
        x = tokens.reshape(B, T, H, W, pt, ph, pw, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, C, T * pt, H * ph, W * pw)

    # ---- forward ----

    def forward(self, latents: Tensor, t: Tensor, context: Tensor, group: object | None = None) -> Tensor:
        grid = self.grid(latents.shape)
        tokens = self.forward_tokens(latents, t, context, group=group)
        if group is not None:
            from difforge.parallel import gather_sequence

            tokens = gather_sequence(tokens, group)
        return self.unpatchify(tokens, grid)

    def forward_chunk(
        self, latents: Tensor, t: Tensor, context: Tensor, kv_cache: ChunkKVCache, *, frame_offset: int,
        commit: bool = False,
    ) -> Tensor:  # fmt: skip
        """Chunk-wise autoregressive call: the velocity of a chunk of latent frames ``[B, C, Tc, H, W]`` whose first
        token frame is frame ``frame_offset`` of the video (RoPE positions), attending to the frames committed to
        ``kv_cache`` and bidirectionally within the chunk. ``commit=True`` appends the chunk's keys/values (call it
        once, on the clean chunk at t = 0)."""
        grid = self.grid(latents.shape)
        kv_cache.begin(frames=grid[0], commit=commit)
        tokens = self.forward_tokens(latents, t, context, kv_cache=kv_cache, frame_offset=frame_offset)
        return self.unpatchify(tokens, grid)

    def forward_tokens(
        self, latents: Tensor, t: Tensor, context: Tensor, group: object | None = None, *,
        kv_cache: ChunkKVCache | None = None, frame_offset: int = 0,
    ) -> Tensor:  # fmt: skip
        c = self.config
        grid = self.grid(latents.shape)
        B = latents.shape[0]
        t = self._check_time(t, B, grid[0])
        if context.dim() != 3 or context.shape[0] != B or context.shape[2] != c.context_dim:
            raise ValueError(
                f"VideoDiT: context must be [B={B}, Lc, context_dim={c.context_dim}], got {tuple(context.shape)}"
            )
        if c.attention == "hybrid":
            layout = SkiparseLayout(grid, c.sparse_ratio, batch=B, dims=c.sparse_dims, group=group, backend=c.backend)
        else:
            layout = SequenceLayout(grid, batch=B, group=group, backend=c.backend)
        if (kv_cache is not None or c.causal_chunk) and group is not None:
            raise ValueError("VideoDiT: block-causal / chunk-wise models run on one process per sample (group=None)")
        layout.kv_cache, layout.causal_chunk = kv_cache, c.causal_chunk
        dtype = self.patch_embedding.weight.dtype
        x = layout.arrange(self.patch_embedding(self.patchify(latents.to(dtype))))
        e = self.time_embedding(sinusoidal_embedding(t * 1000, c.freq_dim).to(dtype))  # [B, F, dim]
        frame_tokens = grid[1] * grid[2]
        block_modulation = FrameModulation(self.time_projection(e), layout, frame_tokens)
        ctx = self.text_embedding(context.to(dtype))
        # RoPE positions of the chunk's frames within the whole video.
        angles = self._rope((frame_offset + grid[0], *grid[1:]), latents.device)[frame_offset * frame_tokens :]
        residual = None  # each block's last gated residual, fused into the next norm while the layout stays
        for kind, block in zip(self.schedule, self.blocks):
            if kind != layout.kind:
                x, residual = _flush(x, residual), None
                x = layout.to(x, kind)
            x, residual = block(x, block_modulation, ctx, layout, angles, residual)
        if layout.kind != "full":
            x, residual = _flush(x, residual), None
            x = layout.to(x, "full")
        # Wan's head: the same embedding e plus a 2-row table gives (shift, scale).
        head_modulation = FrameModulation(e.repeat(1, 1, 2), layout, frame_tokens)
        shift, scale = head_modulation.chunks(self.head_modulation)
        if residual is None:
            return self.head(self.head_norm(x, scale, shift))
        _, y = self.head_norm.forward_gated(x, residual.o, residual.gate, scale, shift)  # full layout: repeat 1
        return self.head(y)

    def _check_time(self, t: Tensor, batch: int, frames: int) -> Tensor:
        if not torch.is_floating_point(t):
            raise TypeError(f"VideoDiT: t must be a float tensor, got {t.dtype}")
        if t.shape == (batch,):
            return t[:, None]
        if t.shape == (batch, frames):
            return t
        raise ValueError(f"VideoDiT: t must be [B={batch}] or per latent frame [B, {frames}], got {tuple(t.shape)}")

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> Tensor:
        key = (grid, device)
        if key not in self._angles:
            self._angles[key] = rope_angles_3d(grid, self.config.head_dim, theta=self.config.rope_theta, device=device)
        return self._angles[key]

    def extra_repr(self) -> str:
        c = self.config
        kinds = "".join(k[0].upper() for k in self.schedule)
        return f"dim={c.dim}, depth={c.depth}, heads={c.num_heads}, patch={c.patch}, schedule={kinds}"
