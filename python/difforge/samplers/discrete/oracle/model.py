"""An exact oracle dressed as a network ``model(x_t [B, L], alpha [B]) -> [B, L, N]``, so samplers run on it
unchanged and their error is the sampler's alone."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difforge.samplers.discrete.oracle.base import Oracle

OUTPUTS = ("denoiser", "loo", "score")


class OracleModel:
    """``OracleModel(oracle, process, output)(x_t, alpha)``: exact network outputs over the N data tokens.

    * ``"denoiser"``: ``log p(x0_i = y | x_t)``;
    * ``"loo"``: ``log p(x0_i = y | x_t^{-i})``;
    * ``"score"``: the log concrete score ``log s_{i,y} = log p_t(x^{i<-y}) - log p_t(x)`` (spec §2), from the
      exact single-site conditional. Uniform: ``cond(y) = alpha p_LOO(y) + (1 - alpha) / N`` and
      ``log s_y = log cond(y) - log cond(x_i)``. Masked, at a masked position: ``log(alpha / (1 - alpha)) +
      log p_den(y)`` (the mask column ``s_m = 1`` is implicit). Masked, at an unmasked position ``x_i = v``:
      ``log p_LOO(y) - log p_LOO(v)`` (0 at y = v); the exact mask entry ``s_m = (1 - alpha) / (alpha
      p_LOO(v))`` lies outside the N columns and is left out.

    Every call counts one NFE in ``self.calls``. Outputs are float32 unless another ``dtype`` is given.
    """

    def __init__(self, oracle: Oracle, process: str, output: str = "denoiser", dtype: torch.dtype = torch.float32):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if process not in ("masked", "uniform"):
            raise ValueError(f"process must be 'masked' or 'uniform', got {process!r}")
        self.oracle, self.process, self.output, self.dtype = oracle, process, output, dtype
        self.calls = 0

    def __call__(self, x_t: Tensor, alpha) -> Tensor:
        """The exact output for ``x_t`` int64 ``[B, L]`` at signal level ``alpha`` (``[B]`` or a float)."""
        self.calls += 1
        if self.output == "denoiser":
            out = self.oracle.denoiser(x_t, alpha, self.process)
        elif self.output == "loo":
            out = self.oracle.loo(x_t, alpha, self.process)
        else:
            out = self._log_score(x_t, alpha)
        return out.to(self.dtype)

    def _log_score(self, x_t: Tensor, alpha) -> Tensor:
        log_loo = self.oracle.loo(x_t, alpha, self.process)
        a = torch.as_tensor(alpha, dtype=torch.float64, device=log_loo.device).expand(x_t.shape[0]).reshape(-1, 1, 1)
        vocab = self.oracle.vocab_size
        if self.process == "uniform":
            cond = torch.logaddexp(torch.log(a) + log_loo, torch.log1p(-a) - math.log(vocab))
            return cond - cond.gather(-1, x_t.unsqueeze(-1))
        # A masked position's own evidence is flat, so there p_LOO = p_den.
        masked = (x_t == vocab).unsqueeze(-1)
        own = log_loo.gather(-1, x_t.clamp_max(vocab - 1).unsqueeze(-1))
        return torch.where(masked, log_loo + torch.log(a) - torch.log1p(-a), log_loo - own)
