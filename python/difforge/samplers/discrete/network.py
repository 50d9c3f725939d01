"""The network as a sampler sees it: one call = one NFE, checked output, and the conversion each rule needs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from difforge.samplers.discrete import convert

OUTPUTS = ("denoiser", "loo", "score")


class Network:
    """Wraps ``model(x_t [B, L] int64, alpha [B]) -> [B, L, N]`` log-probabilities (``output="denoiser"``,
    the default), leave-one-out log-probabilities (``"loo"``) or log concrete scores (``"score"``)."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], *, process: str, vocab_size: int, output: str):
        if output not in OUTPUTS:
            raise ValueError(f"model_output must be one of {OUTPUTS}, got {output!r}")
        if process == "masked" and output == "loo":
            output = "denoiser"  # identical at masked positions, the only ones a masked sampler reads
        self.model, self.process, self.vocab_size, self.output = model, process, vocab_size, output
        self.nfe = 0

    def __call__(self, x: Tensor, alpha: float | Tensor) -> Tensor:
        """The raw output at signal level alpha (a float, or one per row), validated."""
        if not isinstance(alpha, Tensor):
            alpha = torch.full((x.shape[0],), float(alpha), device=x.device)
        out = self.model(x, alpha.to(device=x.device, dtype=torch.float32))
        self.nfe += 1
        expected = (*x.shape, self.vocab_size)
        if not isinstance(out, Tensor) or tuple(out.shape) != expected or not out.is_floating_point():
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model must return a float tensor of shape {expected} (x_t shape + vocab_size), got {got}")
        if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            out = out.float()
        return out

    def denoiser(self, x: Tensor, alpha: float | Tensor) -> Tensor:
        """log p(x0_i = y | x_t) (masked: at masked positions; up to a per-row constant)."""
        out, a = self(x, alpha), self._alpha(x, alpha)
        if self.output == "denoiser":
            return out
        if self.process == "masked":
            return convert.masked_denoiser_from_score(out.float())
        loo = out.float() if self.output == "loo" else convert.loo_from_score(out.float(), a)
        return convert.denoiser_from_loo(loo, x, a)

    def loo(self, x: Tensor, alpha: float | Tensor) -> Tensor:
        """Uniform: log p(x0_i = y | x_t^{-i}), normalized."""
        out, a = self(x, alpha), self._alpha(x, alpha)
        if self.output == "loo":
            return torch.log_softmax(out.float(), -1)
        if self.output == "score":
            return convert.loo_from_score(out.float(), a)
        return convert.loo_from_denoiser(out.float(), x, a)

    def score(self, x: Tensor, alpha: float | Tensor) -> Tensor:
        """Uniform: log s_{i,y}, 0 at y = x_i."""
        out, a = self(x, alpha), self._alpha(x, alpha)
        if self.output == "score":
            return out.float() - out.float().gather(-1, x.unsqueeze(-1))
        loo = torch.log_softmax(out.float(), -1) if self.output == "loo" else convert.loo_from_denoiser(out.float(), x, a)
        return convert.score_from_loo(loo, x, a)

    @staticmethod
    def _alpha(x: Tensor, alpha: float | Tensor) -> Tensor:
        if isinstance(alpha, Tensor):
            return alpha.to(device=x.device, dtype=torch.float32)
        return torch.full((x.shape[0],), float(alpha), device=x.device)
