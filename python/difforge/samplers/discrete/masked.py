"""Masked (absorbing) diffusion samplers (spec §4): MDLM ancestral, first hitting, ReMDM, and confidence-ordered
decoding (LLaDA low-confidence remasking with semi-autoregressive blocks, Fast-dLLM thresholds).

The network gives log x̂ = log p(x0_i | x_t) over the N data tokens; the mask id m is outside them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difforge.ops import sampling as ops
from difforge.samplers.discrete.context import Context
from difforge.samplers.discrete.schedules import time_grid
from difforge.samplers.discrete.steps import MixtureStep, RemaskStep, WhereStep

KEEP = (0.0, 0.0, 1.0)


def _unmask_coef(masked: Tensor, w_p: Tensor | float, w_d: Tensor | float) -> Tensor:
    """(w_p, 0, w_d) at masked positions, keep elsewhere."""
    w_p = torch.as_tensor(w_p, dtype=torch.float32, device=masked.device).expand(masked.shape)
    w_d = torch.as_tensor(w_d, dtype=torch.float32, device=masked.device).expand(masked.shape)
    unmask = torch.stack([w_p, torch.zeros_like(w_p), w_d], -1)
    return torch.where(masked.unsqueeze(-1), unmask, unmask.new_tensor(KEEP))


def _clean_fraction(x: Tensor, mask_id: int) -> Tensor:
    """A time-agnostic alpha for each row: the fraction of positions already unmasked."""
    return (x != mask_id).float().mean(-1)


def mdlm(ctx: Context, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """Ancestral t -> s: a masked token unmasks with probability (alpha_s - alpha_t) / (1 - alpha_t), to a draw of
    x̂ (``top_p``: MDLM/ReMDM nucleus on x̂); the last step (alpha_s = 1) unmasks everything."""
    m = ctx.mask_id
    grid = time_grid(ctx.steps)
    for t, s in zip(grid, grid[1:]):
        a_t, a_s = ctx.alpha(t), ctx.alpha(s)
        x = ctx.chain.x
        masked = x == m
        log_den = ctx.net.denoiser(x, a_t)
        coef = _unmask_coef(masked, (a_s - a_t) / (1.0 - a_t), (1.0 - a_s) / (1.0 - a_t))
        point = torch.where(masked, m, x)
        ctx.chain.apply(MixtureStep(log_den, point, coef, temperature=temperature, top_k=top_k, top_p=top_p))


def first_hitting(ctx: Context, *, temperature: float = 1.0, seed: int = 0) -> None:
    """Exact continuous-time law, one token per network call (arXiv 2409.02908): with n masked tokens the next
    unmasking happens at alpha' = 1 - (1 - alpha) u^(1/n), at a uniformly chosen masked position, drawn from
    x̂ at alpha'. ``steps`` is ignored: NFE = L."""
    ctx.require_sampling("first_hitting")
    m, x = ctx.mask_id, ctx.chain.x
    rows = x.shape[0]
    uniforms = torch.Generator().manual_seed(seed)  # B uniforms per event, drawn on the CPU on every device
    alpha = torch.zeros(rows, device=x.device)
    keep_coef = torch.tensor([1.0, 0.0, 0.0], device=x.device)
    for _ in range(x.shape[1]):
        x = ctx.chain.x
        masked = x == m
        n = masked.sum(-1)
        if not bool((n > 0).any()):
            break
        u = torch.rand(rows, generator=uniforms, dtype=torch.float64).to(x.device)
        hit = 1.0 - (1.0 - alpha.double()) * u ** (1.0 / n.clamp_min(1).double())
        alpha = torch.where(n > 0, hit, alpha.double()).float()
        log_den = ctx.net.denoiser(x, alpha)
        where = ctx.chain.select(torch.zeros(x.shape, device=x.device), 1, gumbel_tau=1.0, eligible=masked)
        ctx.chain.apply(MixtureStep(log_den, x, keep_coef, temperature=temperature), positions=where)


def _loop_alpha(ctx: Context, t: float, t_on: float, t_off: float, alpha_on: float) -> float:
    """ReMDM-loop's signal level: the schedule rescaled to reach alpha_on at t_on, held there until t_off, then
    rescaled from alpha_on to 1."""
    if t >= t_on:
        return alpha_on * ctx.alpha(t) / ctx.alpha(t_on)
    if t > t_off:
        return alpha_on
    return 1.0 - (1.0 - alpha_on) * (1.0 - ctx.alpha(t)) / (1.0 - ctx.alpha(t_off))


REMDM_STRATEGIES = ("cap", "rescale", "conf", "loop")


def remdm(
    ctx: Context,
    *,
    strategy: str = "cap",
    eta: float = 0.02,
    t_on: float = 0.55,
    t_off: float = 0.05,
    alpha_on: float = 0.9,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> None:
    """ReMDM (t -> s): unmasked tokens are remasked with probability sigma_i <= sigma_max = min(1, (1 - alpha_s) /
    alpha_t) and masked ones unmask with (alpha_s - (1 - sigma_i) alpha_t) / (1 - alpha_t), which keeps
    P(mask at s) = 1 - alpha_s. sigma: ``cap`` min(eta, sigma_max), ``rescale`` eta sigma_max, ``conf`` eta_i
    sigma_max with eta = softmax over unmasked j of -conf_j (the probability each token had when it was
    unmasked; masked positions get the MDLM update), ``loop`` MDLM to alpha_on at t_on, eta remasking at a held
    alpha_on until t_off, then MDLM to 0."""
    if strategy not in REMDM_STRATEGIES:
        raise ValueError(f"remdm: strategy must be one of {REMDM_STRATEGIES}, got {strategy!r}")
    if strategy == "conf":
        ctx.require_sampling("remdm (conf)")
    m = ctx.mask_id
    x = ctx.chain.x
    conf = torch.full(x.shape, -math.inf, device=x.device)
    grid = time_grid(ctx.steps)
    for t, s in zip(grid, grid[1:]):
        if strategy == "loop":
            a_t, a_s = (_loop_alpha(ctx, u, t_on, t_off, alpha_on) for u in (t, s))
            a_s = 1.0 if s == 0.0 else a_s
        else:
            a_t, a_s = ctx.alpha(t), ctx.alpha(s)
        sigma_max = min(1.0, (1.0 - a_s) / a_t)
        x = ctx.chain.x
        masked = x == m
        if strategy == "loop":
            sigma = torch.full(x.shape, eta if t_off < t <= t_on else 0.0, device=x.device)
        elif strategy == "cap":
            sigma = torch.full(x.shape, min(eta, sigma_max), device=x.device)
        elif strategy == "rescale":
            sigma = torch.full(x.shape, eta * sigma_max, device=x.device)
        else:
            weights = torch.softmax(torch.where(masked, -math.inf, -conf), -1).nan_to_num(0.0)
            sigma = eta * weights * sigma_max
        sigma = torch.where(masked, 0.0, sigma) if strategy == "conf" else sigma
        sigma = sigma.clamp(max=sigma_max)
        log_den = ctx.net.denoiser(x, a_t)
        w_p = ((a_s - (1.0 - sigma) * a_t) / (1.0 - a_t)).clamp_min(0.0)
        w_d = ((1.0 - a_s - sigma * a_t) / (1.0 - a_t)).clamp_min(0.0)
        unmask = MixtureStep(log_den, torch.where(masked, m, x), _unmask_coef(masked, w_p, w_d),
                             temperature=temperature, top_p=top_p)  # fmt: skip
        remask = RemaskStep(x, torch.where(masked, 0.0, sigma), m)
        ctx.chain.apply(WhereStep(masked, unmask, remask))
        if strategy == "conf":
            new = ctx.chain.x
            fresh = masked & (new != m)
            p_new = torch.log_softmax(log_den.float(), -1).gather(-1, new.clamp_max(ctx.vocab_size - 1).unsqueeze(-1))
            conf = torch.where(fresh, p_new.squeeze(-1).exp(), torch.where(new == m, -math.inf, conf))


CONFIDENCE_ORDERS = ("confidence", "margin", "entropy", "random")


def _order_key(order: str, token_stats: Tensor) -> Tensor:
    """Larger = commit first. confidence: p(x0_i) of the drawn token; margin: p1 - p2; entropy: -H."""
    stat = dict(zip(ops.STATS, token_stats.unbind(-1)))
    if order == "confidence":
        return stat["logp_token"].exp()
    if order == "margin":
        return (stat["top1"] - stat["lse"]).exp() - (stat["top2"] - stat["lse"]).exp()
    if order == "entropy":
        return -stat["entropy"]
    return torch.zeros_like(stat["lse"])


def confidence(
    ctx: Context,
    *,
    block_length: int | None = None,
    threshold: float | None = None,
    order: str = "confidence",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> None:
    """Confidence-ordered decoding over semi-autoregressive blocks (LLaDA ``generate``): each call draws x0 for
    the masked positions of the current block and commits those with the highest order key. Without
    ``threshold``: ``steps / blocks`` calls per block, k_b[j] = n_b // S + (j < n_b % S) commits per call (LLaDA).
    With ``threshold`` (Fast-dLLM): the top position plus every one whose key >= threshold, until the block is
    done (adaptive NFE). The network sees alpha = the fraction of positions already unmasked."""
    ctx.require_sampling("confidence")
    if order not in CONFIDENCE_ORDERS:
        raise ValueError(f"confidence: order must be one of {CONFIDENCE_ORDERS}, got {order!r}")
    m = ctx.mask_id
    length = ctx.chain.x.shape[1]
    block_length = block_length or length
    if length % block_length:
        raise ValueError(f"confidence: block_length {block_length} must divide the sequence length {length}")
    blocks = length // block_length
    if threshold is None and ctx.steps % blocks:
        raise ValueError(f"confidence: steps ({ctx.steps}) must be a multiple of the number of blocks ({blocks})")
    per_block = ctx.steps // blocks
    positions = torch.arange(length, device=ctx.chain.x.device)
    draw_coef = torch.tensor([1.0, 0.0, 0.0], device=positions.device)
    for b in range(blocks):
        in_block = (positions >= b * block_length) & (positions < (b + 1) * block_length)
        n_b = ((ctx.chain.x == m) & in_block).sum(-1)
        j = 0
        while True:
            x = ctx.chain.x
            eligible = (x == m) & in_block
            if threshold is None and j == per_block:
                break
            if threshold is not None and not bool(eligible.any()):
                break
            log_den = ctx.net.denoiser(x, _clean_fraction(x, m))
            step = MixtureStep(log_den, x, draw_coef, temperature=temperature, top_k=top_k, top_p=top_p)
            token, stats = step.only(eligible, x).draw_with_stats(ctx.chain.seed, ctx.chain.offsets)
            key = torch.where(eligible, _order_key(order, stats), -math.inf)
            noise = 1.0 if order == "random" else 0.0
            if threshold is None:
                k = n_b // per_block + (j < n_b % per_block).long()
                chosen = ctx.chain.select(key, k, gumbel_tau=noise, eligible=eligible)
            else:
                chosen = ctx.chain.select(key, 1, gumbel_tau=noise, eligible=eligible, threshold=threshold)
            ctx.chain.x = torch.where(chosen, token, x)
            j += 1
