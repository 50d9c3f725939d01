"""Uniform-process samplers (spec §5): SEDD Euler, Tweedie ("analytic") tau-leaping, Campbell tau-leaping, the
CTMC predictor-corrector, informed predictor-corrector (DUO ancestral + LOO Gibbs) and GADD, the Gibbs corrector
built from the concrete score.

Rate-based samplers integrate on ``steps + 1`` equal times from 1 to ``eps`` and finish with one denoising call
at ``eps`` (SEDD's layout): NFE = steps + 1 (+ the corrector calls). Rates are sigma'(t) / N * s_{i,y} at the
left end of each step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difforge.samplers.discrete import convert
from difforge.samplers.discrete.context import Context
from difforge.samplers.discrete.schedules import time_grid
from difforge.samplers.discrete.steps import MixtureStep, RandomPositions, TweedieStep

PREDICTORS = ("euler", "tau_leap", "tweedie")
DENOISERS = ("tweedie", "argmax", "none")
SELECTIONS = ("lowest_log_margin", "lowest_maxprob", "lowest_current_prob", "random")


def _row_tensor(value: float, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), value, dtype=torch.float32, device=like.device)


def _predict(ctx: Context, predictor: str, t: float, s: float) -> None:
    """One predictor step t -> s from the score at t."""
    x = ctx.chain.x
    a_t, a_s = ctx.alpha(t), ctx.alpha(s)
    log_score = ctx.net.score(x, a_t)
    if predictor == "tweedie":
        ctx.chain.apply(TweedieStep(log_score, x, _row_tensor(a_t / a_s, x)))
        return
    c = (t - s) * ctx.schedule.dsigma(t) / ctx.vocab_size
    ctx.chain.apply(MixtureStep(log_score, x, torch.tensor([c, 0.0, 0.0], device=x.device), rule=predictor))


def _denoise(ctx: Context, how: str, t: float) -> None:
    """The final call at t -> 0: Tweedie to sigma = 0 (SEDD), or the denoiser's argmax."""
    x = ctx.chain.x
    if how == "tweedie":
        ctx.chain.apply(TweedieStep(ctx.net.score(x, ctx.alpha(t)), x, _row_tensor(ctx.alpha(t), x)))
    elif how == "argmax":
        log_den = ctx.net.denoiser(x, ctx.alpha(t))
        ctx.chain.apply(MixtureStep(log_den, x, torch.tensor([1.0, 0.0, 0.0], device=x.device), greedy=True))


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _integrate(ctx: Context, predictor: str, eps: float, denoise: str, corrector=None) -> None:
    _check("predictor", predictor, PREDICTORS)
    _check("denoise", denoise, DENOISERS)
    grid = time_grid(ctx.steps, eps)
    for k, (t, s) in enumerate(zip(grid, grid[1:])):
        _predict(ctx, predictor, t, s)
        if corrector is not None:
            corrector(k, t, s)
    _denoise(ctx, denoise, grid[-1])


def euler(ctx: Context, *, eps: float = 1e-3, denoise: str = "tweedie") -> None:
    """SEDD Euler: position i jumps with probability min(dt sigma'/N sum_{y != x_i} s_iy, 1), to y ∝ s_iy."""
    _integrate(ctx, "euler", eps, denoise)


def analytic(ctx: Context, *, eps: float = 1e-3, denoise: str = "tweedie") -> None:
    """SEDD analytic: Tweedie tau-leaping, exact for one token given exact scores (the two-pass kernel)."""
    _integrate(ctx, "tweedie", eps, denoise)


def tau_leaping(ctx: Context, *, eps: float = 1e-3, denoise: str = "tweedie") -> None:
    """Campbell tau-leaping with multiple jumps rejected: one jump with probability L e^-L, L = dt sum of rates."""
    _integrate(ctx, "tau_leap", eps, denoise)


def ctmc_pc(
    ctx: Context,
    *,
    predictor: str = "tau_leap",
    corrector_steps: int = 2,
    corrector_t_on: float = 0.9,
    corrector_size: float = 0.1,
    eps: float = 1e-3,
    denoise: str = "tweedie",
) -> None:
    """Campbell's CTMC predictor-corrector: after each predictor step landing at s <= corrector_t_on,
    ``corrector_steps`` tau-leaps of size corrector_size * dt with the reverse + forward rate
    R^c_iy = sigma'(s)/N (s_iy + 1) (p_s-reversible). NFE = steps + 1 + corrector_steps * #corrected steps."""

    def correct(k: int, t: float, s: float) -> None:
        if s > corrector_t_on:
            return
        for _ in range(corrector_steps):
            x = ctx.chain.x
            c = corrector_size * (t - s) * ctx.schedule.dsigma(s) / ctx.vocab_size
            step = MixtureStep(ctx.net.score(x, ctx.alpha(s)), x, torch.tensor([c, 0.0, 0.0], device=x.device),
                               rule="ctmc")  # fmt: skip
            ctx.chain.apply(step)

    _integrate(ctx, predictor, eps, denoise, correct)


def _selection_key(select: str, cond: Tensor, x: Tensor) -> Tensor:
    """Larger = corrected first, from the single-site conditional log p_t(x_i = y | x_-i) (rev_udm's rules)."""
    current = cond.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    if select == "lowest_current_prob":
        return -current
    if select == "lowest_maxprob":
        return -cond.amax(-1)
    if select == "lowest_log_margin":
        best_other = cond.scatter(-1, x.unsqueeze(-1), -math.inf).amax(-1)
        return -(current - best_other)
    return torch.zeros_like(current)


def _gibbs_positions(ctx: Context, positions: int, select: str, select_tau: float, cond: Tensor):
    """Exact random scan for a uniform choice; otherwise Gumbel-top-k of the selection key over tau."""
    x = ctx.chain.x
    k = min(positions, x.shape[1])
    if select == "random":
        return RandomPositions(k)
    ctx.require_sampling(f"Gibbs selection {select!r}")
    return ctx.chain.select(_selection_key(select, cond, x), k, gumbel_tau=select_tau)


def gadd(
    ctx: Context,
    *,
    predictor: str = "euler",
    rounds: int = 2,
    positions: int = 12,
    t_on: float = 0.9,
    select: str = "lowest_log_margin",
    select_tau: float = 1.0,
    eps: float = 1e-3,
    denoise: str = "tweedie",
) -> None:
    """GADD (arXiv 2605.27352, reconstructed; spec §5): a predictor step, then once the step lands at
    s <= t_on (and it is not the last step) ``rounds`` Gibbs rounds, each one network call: the concrete score
    at s gives every position's exact single-site conditional p_s(x_i = y | x_-i) = s_iy / sum_z s_iz, and
    ``positions`` positions per row are redrawn from it. positions = 1 with ``select="random"`` is exact
    random-scan Gibbs (leaves p_s invariant); more positions are blocked Gibbs under conditional independence,
    chosen by ``select`` (Gumbel-top-k with temperature select_tau). NFE = steps + rounds * #corrected + 1."""
    _check("select", select, SELECTIONS)

    def correct(k: int, t: float, s: float) -> None:
        if s > t_on or k == ctx.steps - 1:
            return
        for _ in range(rounds):
            x = ctx.chain.x
            log_score = ctx.net.score(x, ctx.alpha(s))
            where = _gibbs_positions(ctx, positions, select, select_tau, torch.log_softmax(log_score, -1))
            ctx.chain.apply(MixtureStep(log_score, x, torch.tensor([1.0, 0.0, 0.0], device=x.device)), positions=where)

    _integrate(ctx, predictor, eps, denoise, correct)


def _ancestral(ctx: Context, t: float, s: float, greedy: bool) -> None:
    """DUO's plug-in posterior fed the LOO posterior, which makes it exact (spec §5, check d):
    q(y) ∝ N a_t p(x_i) 1[y = x_i] + (a - a_t) 1[y = x_i] + (a_s - a_t) p(y) + (1 - a)(1 - a_s) / N, a = a_t/a_s."""
    x = ctx.chain.x
    a_t, a_s = ctx.alpha(t), ctx.alpha(s)
    log_loo = ctx.net.loo(x, a_t)
    if greedy:
        log_den = convert.denoiser_from_loo(log_loo, x, _row_tensor(a_t, x))
        ctx.chain.apply(MixtureStep(log_den, x, torch.tensor([1.0, 0.0, 0.0], device=x.device), greedy=True))
        return
    a = a_t / a_s
    p_current = log_loo.gather(-1, x.unsqueeze(-1)).squeeze(-1).double().exp()
    w_d = ctx.vocab_size * a_t * p_current + (a - a_t)
    coef = torch.stack([torch.full_like(w_d, a_s - a_t), torch.full_like(w_d, (1 - a) * (1 - a_s)), w_d], -1)
    ctx.chain.apply(MixtureStep(log_loo, x, coef.float()))


def informed_pc(
    ctx: Context,
    *,
    corrector_steps: int = 2,
    positions: int = 12,
    select: str = "lowest_log_margin",
    select_tau: float = 1.0,
    greedy_last: bool = False,
) -> None:
    """Informed predictor-corrector (rev_udm ``predictor_corrector_gibbs``): DUO ancestral steps t -> s on
    ``steps + 1`` times from 1 to 0 and, while s > 0, ``corrector_steps`` Gibbs rounds from the LOO posterior:
    cond = alpha_s p_loo + (1 - alpha_s)/N, ``positions`` positions by ``select`` (Gumbel-top-k).
    NFE = steps + corrector_steps * (steps - 1)."""
    _check("select", select, SELECTIONS)
    grid = time_grid(ctx.steps)
    for t, s in zip(grid, grid[1:]):
        _ancestral(ctx, t, s, greedy=greedy_last and s == 0.0)
        if s == 0.0:
            break
        a_s = ctx.alpha(s)
        for _ in range(corrector_steps):
            x = ctx.chain.x
            log_loo = ctx.net.loo(x, a_s)
            cond = convert.conditional_from_loo(log_loo, _row_tensor(a_s, x))
            where = _gibbs_positions(ctx, positions, select, select_tau, cond)
            coef = torch.tensor([a_s, 1.0 - a_s, 0.0], device=x.device)
            ctx.chain.apply(MixtureStep(log_loo, x, coef), positions=where)
