"""A small bidirectional transformer for discrete diffusion: the denoiser ``log p(x0_i = y | x_t)`` of a masked
(absorbing) or uniform process over N data tokens, conditioned on the noise level alpha.

Blocks are DiT-style: alpha -> sinusoidal features -> MLP -> per-block adaLN modulation (shift, scale, gate for
attention and MLP), the norms being difforge's fused :class:`~difforge.nn.ModulatedNorm` (each block's last gated
residual is fused into the next block's first norm), attention difforge's flash attention (or torch SDPA) over
all positions with rotary positions (2D over an image grid, or 1D). The model knows nothing about samplers:
``forward(x_t, alpha)`` is the denoiser every sampler in :mod:`difforge.samplers.discrete` calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difforge.models.video_dit import sinusoidal_embedding
from difforge.nn.dit_block import ModulatedNorm, PendingResidual
from difforge.nn.rope import apply_rope
from difforge.nn.skiparse import attend

Process = Literal["masked", "uniform"]


@dataclass(frozen=True)
class DiscreteTransformerConfig:
    """Architecture of a :class:`DiscreteTransformer`.

    ``vocab_size`` N data tokens; the masked process adds the mask id N to the input vocabulary. ``grid`` (H, W)
    with ``H * W = length`` lays the sequence out row-major as an image for 2D rotary positions (half the rotary
    pairs per axis); ``None`` uses 1D positions. ``ffn`` defaults to ``4 * dim``. ``fused_norm=False`` and
    ``backend="sdpa"`` select plain-PyTorch norms and attention (same parameters, same math)."""

    vocab_size: int = 17
    length: int = 64
    dim: int = 128
    depth: int = 4
    heads: int = 4
    ffn: int | None = None
    process: Process = "masked"
    grid: tuple[int, int] | None = (8, 8)
    freq_dim: int = 128
    rope_theta: float = 100.0
    eps: float = 1e-6
    fused_norm: bool = True
    backend: Literal["difforge", "sdpa"] = "difforge"

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"DiscreteTransformerConfig: {name} must be {expected}, got {getattr(self, name)!r}")

        if self.vocab_size < 2:
            raise bad("vocab_size", ">= 2")
        for name in ("length", "dim", "depth", "heads", "freq_dim"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if self.ffn is None:
            object.__setattr__(self, "ffn", 4 * self.dim)
        if self.ffn < 1:
            raise bad("ffn", ">= 1")
        if self.dim % self.heads or (self.dim // self.heads) % 4:
            raise bad("heads", f"a divisor of dim = {self.dim} leaving a head dim divisible by 4 (2D rotary pairs)")
        if self.freq_dim % 2:
            raise bad("freq_dim", "even")
        if self.process not in ("masked", "uniform"):
            raise bad("process", '"masked" or "uniform"')
        if self.backend not in ("difforge", "sdpa"):
            raise bad("backend", '"difforge" or "sdpa"')
        if self.grid is not None:
            grid = tuple(int(g) for g in self.grid)
            if len(grid) != 2 or min(grid) < 1 or grid[0] * grid[1] != self.length:
                raise bad("grid", f"(H, W) with H * W = length = {self.length}, or None")
            object.__setattr__(self, "grid", grid)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mask_id(self) -> int | None:
        """The mask token (N) of the masked process; None for the uniform one."""
        return self.vocab_size if self.process == "masked" else None

    @property
    def input_vocab(self) -> int:
        """Tokens the model reads: N + 1 (with the mask) for the masked process, N for the uniform one."""
        return self.vocab_size + (self.process == "masked")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = None if self.grid is None else list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiscreteTransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DiscreteTransformerConfig: unknown fields {unknown}")
        grid = d.get("grid", cls.grid)
        return cls(**{**d, "grid": None if grid is None else tuple(grid)})


def rope_angles_2d(grid: tuple[int, int] | None, length: int, head_dim: int, theta: float) -> Tensor:
    """``[length, head_dim/2]`` rotary angles (float32, computed in float64): on a grid (H, W), the first half of
    the pairs rotate with the row and the rest with the column, frequencies ``theta^(-i/n)`` over each axis' n
    pairs; without a grid, every pair rotates with the sequence index."""
    pairs = head_dim // 2

    def axis(positions: Tensor, n: int) -> Tensor:
        return torch.outer(positions, theta ** (-torch.arange(n, dtype=torch.float64) / n))

    index = torch.arange(length, dtype=torch.float64)
    if grid is None:
        return axis(index, pairs).float()
    width = grid[1]
    rows = pairs // 2
    return torch.cat((axis(index.div(width).floor(), rows), axis(index % width, pairs - rows)), dim=-1).float()


class _SelfAttention(nn.Module):
    """Bidirectional multi-head attention with q/k RMSNorm and rotary positions."""

    def __init__(self, dim: int, heads: int, backend: str) -> None:
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, dim // heads, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)

    def forward(self, y: Tensor, angles: Tensor) -> Tensor:
        q, k, v = self.qkv(y).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)  # [B, L, H, hd] each
        q = apply_rope(self.q_norm(q), angles[:, None])
        k = apply_rope(self.k_norm(k), angles[:, None])
        return self.out(attend(q, k, v, backend=self.backend).flatten(-2))


class _Block(nn.Module):
    """adaLN-modulated attention and MLP with gated residuals; the MLP's residual is left pending for the next
    norm to fuse (:class:`~difforge.nn.PendingResidual`)."""

    def __init__(self, c: DiscreteTransformerConfig) -> None:
        super().__init__()
        self.norm1 = ModulatedNorm(c.dim, eps=c.eps, fused=c.fused_norm)
        self.attn = _SelfAttention(c.dim, c.heads, c.backend)
        self.norm2 = ModulatedNorm(c.dim, eps=c.eps, fused=c.fused_norm)
        self.mlp = nn.Sequential(nn.Linear(c.dim, c.ffn), nn.GELU(approximate="tanh"), nn.Linear(c.ffn, c.dim))
        # adaLN-zero: every gate starts at 0, so each block starts as the identity.
        self.modulation = nn.Linear(c.dim, 6 * c.dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(
        self, x: Tensor, cond: Tensor, angles: Tensor, residual: PendingResidual | None
    ) -> tuple[Tensor, PendingResidual]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)  # [B, dim] each
        if residual is None:
            y = self.norm1(x, scale1, shift1)
        else:
            x, y = self.norm1.forward_gated(x, residual.o, residual.gate, scale1, shift1)
        x, y = self.norm2.forward_gated(x, self.attn(y, angles), gate1, scale2, shift2)
        return x, PendingResidual(self.mlp(y), gate2, 1)


class DiscreteTransformer(nn.Module):
    """Denoiser of a discrete diffusion process over sequences of ``length`` tokens in ``0..N-1``.

    ``forward(x_t, alpha) -> [B, L, N]`` float32 log-probabilities ``log p(x0_i = y | x_t)`` of the clean token
    (a log_softmax over the N data tokens):

    * ``x_t``: int64 ``[B, L]``, tokens in ``0..N-1``, plus the mask id N for the masked process (values are
      not range-checked: that would cost a device sync per call);
    * ``alpha``: float ``[B]`` (or a scalar, shared) signal level in [0, 1] (1 = clean data).

    Masked process, SUBS parametrisation (MDLM): a position that is not masked is carried over, its row being
    log-prob 0 at ``x_t`` and ``-inf`` elsewhere, so the absorbing process' true posterior is built in and the
    mask id never appears in the output. The uniform model outputs the plain denoiser at every position; samplers
    turn it into scores or leave-one-out posteriors.
    """

    def __init__(self, config: DiscreteTransformerConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or DiscreteTransformerConfig()
        self.embedding = nn.Embedding(c.input_vocab, c.dim)
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.depth))
        self.head_norm = ModulatedNorm(c.dim, eps=c.eps, fused=c.fused_norm)
        self.head_modulation = nn.Linear(c.dim, 2 * c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size)
        # Zero head: the untrained model predicts the uniform distribution over the N tokens.
        for layer in (self.head_modulation, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer(
            "angles", rope_angles_2d(c.grid, c.length, c.head_dim, c.rope_theta), persistent=False
        )

    def forward(self, x_t: Tensor, alpha: Tensor) -> Tensor:
        c = self.config
        if x_t.dim() != 2 or x_t.shape[1] != c.length or x_t.dtype != torch.int64:
            raise ValueError(
                f"DiscreteTransformer: x_t must be int64 [B, L={c.length}], got {x_t.dtype} {tuple(x_t.shape)}"
            )
        B = x_t.shape[0]
        alpha = torch.as_tensor(alpha, device=x_t.device)
        if not torch.is_floating_point(alpha) or alpha.shape not in ((), (B,)):
            raise ValueError(f"DiscreteTransformer: alpha must be a float [B={B}] or scalar, got {alpha.dtype} "
                             f"{tuple(alpha.shape)}")  # fmt: skip
        dtype = self.embedding.weight.dtype
        cond = self.time_embedding(sinusoidal_embedding(alpha.expand(B) * 1000, c.freq_dim).to(dtype))
        cond = F.silu(cond)
        x, residual = self.embedding(x_t), None
        for block in self.blocks:
            x, residual = block(x, cond, self.angles, residual)
        shift, scale = self.head_modulation(cond).chunk(2, dim=-1)
        _, y = self.head_norm.forward_gated(x, residual.o, residual.gate, scale, shift)
        log_probs = F.log_softmax(self.head(y).float(), dim=-1)
        if c.process == "masked":
            log_probs = _carry_unmasked(log_probs, x_t, c.vocab_size)
        return log_probs


def _carry_unmasked(log_probs: Tensor, x_t: Tensor, mask_id: int) -> Tensor:
    """SUBS: rows of unmasked positions become the point mass at ``x_t`` (log-prob 0 there, -inf elsewhere)."""
    carried = (x_t != mask_id)[..., None]
    point = torch.full_like(log_probs, float("-inf")).scatter_(-1, x_t.clamp_max(mask_id - 1)[..., None], 0.0)
    return torch.where(carried, point, log_probs)
