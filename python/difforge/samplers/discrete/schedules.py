"""Noise schedules of the discrete forward processes: the signal level alpha(t), t in [0, 1], t = 1 is noise.

A token is still clean with probability alpha(t) (masked), or kept with probability alpha(t) + (1 - alpha)/N
(uniform). sigma(t) = -log alpha(t) is the integrated rate, dsigma its derivative (the rate multiplier of the
CTMC samplers). alpha is clamped to [ALPHA_MIN, 1] so that rates and Tweedie factors stay finite at t = 1,
where the law is uniform (or all-mask) either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA_MIN = 1e-6

SEDD_SIGMA_MIN, SEDD_SIGMA_MAX = 1e-4, 20.0  # SEDD's geometric schedule of the uniform process
LOGLINEAR_EPS = 1e-3  # SEDD's log-linear schedule of the absorbing process


@dataclass(frozen=True)
class Schedule:
    """alpha(t) with its inverse and sigma'(t). Build one with :func:`schedule`."""

    name: str

    def alpha(self, t: float) -> float:
        if self.name == "linear":
            a = 1.0 - t
        elif self.name == "cosine":
            a = 1.0 - math.cos(0.5 * math.pi * (1.0 - t))
        elif self.name == "loglinear":
            a = 1.0 - (1.0 - LOGLINEAR_EPS) * t
        else:  # geometric
            a = math.exp(-(SEDD_SIGMA_MIN ** (1.0 - t) * SEDD_SIGMA_MAX**t))
        return min(1.0, max(ALPHA_MIN, a))

    def sigma(self, t: float) -> float:
        return -math.log(self.alpha(t))

    def dsigma(self, t: float) -> float:
        """d sigma / dt = -alpha'(t) / alpha(t), with alpha clamped as in :meth:`alpha`."""
        a = self.alpha(t)
        if self.name == "linear":
            da = -1.0
        elif self.name == "cosine":
            da = -0.5 * math.pi * math.sin(0.5 * math.pi * (1.0 - t))
        elif self.name == "loglinear":
            da = -(1.0 - LOGLINEAR_EPS)
        else:
            s = SEDD_SIGMA_MIN ** (1.0 - t) * SEDD_SIGMA_MAX**t
            return s * math.log(SEDD_SIGMA_MAX / SEDD_SIGMA_MIN)
        return -da / a

    def time_of(self, alpha: float) -> float:
        """The t with alpha(t) = alpha (the first-hitting sampler's event times)."""
        alpha = min(1.0, max(ALPHA_MIN, alpha))
        if self.name == "linear":
            return 1.0 - alpha
        if self.name == "cosine":
            return 1.0 - 2.0 / math.pi * math.acos(1.0 - alpha)
        if self.name == "loglinear":
            return min(1.0, (1.0 - alpha) / (1.0 - LOGLINEAR_EPS))
        sigma = -math.log(alpha)  # geometric: sigma = smin^(1-t) smax^t
        t = math.log(sigma / SEDD_SIGMA_MIN) / math.log(SEDD_SIGMA_MAX / SEDD_SIGMA_MIN)
        return min(1.0, max(0.0, t))


SCHEDULES = ("linear", "cosine", "loglinear", "geometric")


def schedule(name: str) -> Schedule:
    """The schedule called ``name``: linear (alpha = 1 - t, MDLM), cosine (DUO), loglinear (SEDD absorbing),
    geometric (SEDD uniform, sigma = 1e-4^(1-t) 20^t)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    return Schedule(name)


def time_grid(steps: int, t_end: float = 0.0) -> list[float]:
    """``steps + 1`` equally spaced times from 1 down to ``t_end``."""
    return [1.0 - (1.0 - t_end) * k / steps for k in range(steps + 1)]
