"""Fused discrete-diffusion sampling steps: the per-position update of every masked / uniform sampler as one
streaming pass over each row of logits (three-part mixture, Gumbel race, top-k / top-p, row statistics), Tweedie
tau-leaping (SEDD analytic), and per-row position selection without host syncs.

Math: ``cpp/include/difforge/sampling.h`` (spec discrete_samplers.md §3, §6). Kernels: ``cpp/sampling`` (CPU) and
``cuda/sampling`` (CUDA); schemas: ``bindings/schemas.cpp``. Randomness is counter-based Philox4x32-10 over
(seed, offset, row, column): the same inputs give the same draws on CPU and CUDA, for any batching of the rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difforge.ops._autograd import forbid_backward

_ops = torch.ops.difforge

RULES = ("mixture", "euler", "tau_leap", "ctmc")
STATS = ("logp_token", "lse", "entropy", "top1", "top2")  # the columns of discrete_step's stats

_SEED_LIMIT = 2**63
_OFFSET_LIMIT = 2**32


def _check_seed_offset(op: str, seed: int, offset: int) -> None:
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"{op}: seed must be in [0, 2**63), got {seed}")
    if not 0 <= offset < _OFFSET_LIMIT:
        raise ValueError(f"{op}: offset must be in [0, 2**32), got {offset}")


def _check_rows(op: str, name: str, x: Tensor) -> torch.Size:
    """The leading shape of a ``[..., V]`` row tensor with V >= 2."""
    if x.dim() < 1 or x.shape[-1] < 2:
        raise ValueError(f"{op}: {name} must be [..., V] with V >= 2 columns, got shape {tuple(x.shape)}")
    return x.shape[:-1]


def _per_row(op: str, name: str, value, lead: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A Python number or a tensor broadcast to ``lead``, as a contiguous ``dtype`` tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    try:
        return t.expand(lead).contiguous()
    except RuntimeError:
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} does not broadcast to {tuple(lead)}") from None


def _raise_on_bad_rows(op: str, token: Tensor, causes: str) -> None:
    """One device sync: a ValueError naming the first row with token -1."""
    bad = token < 0
    if not bool(bad.any()):
        return
    flat = bad.reshape(-1)
    first = int(flat.nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(token.shape))) if token.dim() else ()
    raise ValueError(
        f"{op}: {int(flat.sum())} row(s) cannot be sampled, the first at index {index}; likely causes: {causes}. "
        "Pass check=False to get token -1 for such rows instead."
    )


def discrete_step(
    logits: Tensor,
    point: Tensor | int,
    coef: Tensor | tuple[float, float, float],
    *,
    rule: str = "mixture",
    temperature: float = 1.0,
    greedy: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    offset: int = 0,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """One per-position sampler update for every row of ``logits``, fused into one pass over the row.

    Each row draws from the mixture ``q = w_p softmax_T(filtered l) + w_u uniform + w_d 1[y = d]`` with ``d`` the
    row's ``point`` (the current token or the mask id) and weights from the rule:

    * ``"mixture"``: ``(w_p, w_u, w_d) = coef`` (MDLM, ReMDM, DUO, Gibbs/LOO, LLaDA...). Rows with
      ``coef[0] <= 0`` never read their logits (stats NaN), e.g. unmasked rows of a masked sampler.
    * ``"euler"`` (SEDD Euler): ``W = min(c S', 1)``, weights ``(W, 0, 1 - W)``;
      ``"tau_leap"``: ``L = c S'``, ``(L e^-L, 0, 1 - L e^-L)``;
      ``"ctmc"`` (tau-leap of the uniform CTMC corrector): ``L = c (S' + V - 1)``, the jump ``L e^-L`` split
      ``S' : V - 1`` between the softmax and the uniform parts. Here ``c = coef[..., 0]`` (finite, >= 0; the other
      two entries are unused), ``S' = sum_{y != d} exp(l_y)`` (logits are log concrete scores), and the softmax
      and uniform parts range over ``y != d`` when ``0 <= d < V``.

    The softmax part is a Gumbel race ``argmax_y l_y / T + G_y`` over the allowed columns (``greedy``: ``argmax
    l_y``, ties to the lowest index), after the filters: ``top_k`` keeps the logits >= the k-th largest (ties kept)
    and ``top_p`` the smallest top set of ``softmax(l / T)`` (renormalized over the top-k set) with mass >= top_p
    (ties kept); the point is excluded after filtering. When no column is allowed the row takes the point.
    Temperature and filters shape the softmax part only; weights and statistics use the raw logits.

    Args:
        logits: ``[..., V]`` float32/float16/bfloat16, V >= 2, stride 1 in the last dim (leading dims that collapse
            to one row stride, e.g. expanded rows, are read in place; others are copied).
        point: int64 ``[...]`` (= ``logits.shape[:-1]``) or one int for every row; must be >= 0 where the point part
            can be drawn (the mask id ``V`` is fine).
        coef: float ``[..., 3]`` broadcastable to ``logits.shape[:-1] + (3,)`` (e.g. ``[3]``, ``[B, 1, 3]``).
        rule: one of :data:`RULES`. temperature: > 0. top_k: 0 (off) or the k of top-k (>= V: off).
        top_p: in (0, 1] (1: off). seed: in [0, 2**63). offset: in [0, 2**32), e.g. the step index.
        check: raise ValueError if a row cannot be sampled (one device sync); False leaves token -1 there (for
            CUDA graphs and pipelines that check later).

    Returns:
        ``(token, stats)``: token int64 ``[...]``; stats float32 ``[..., 5]`` with columns :data:`STATS` over the
        raw logits: ``log softmax(l)[token]`` (NaN when the token is outside [0, V)), logsumexp, entropy of
        ``softmax(l)``, largest and second largest logit. NaN rows: not read, or cannot be sampled (token -1:
        a NaN / +inf logit, no finite logit, invalid weights). Not differentiable.
    """
    op = "discrete_step"
    if rule not in RULES:
        raise ValueError(f"{op}: rule must be one of {RULES}, got {rule!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{op}: top_p must be in (0, 1] (1: off), got {top_p}")
    if top_k < 0:
        raise ValueError(f"{op}: top_k must be >= 0 (0: off), got {top_k}")
    _check_seed_offset(op, seed, offset)
    lead = _check_rows(op, "logits", logits)
    if isinstance(point, int):
        point = torch.full(lead, point, dtype=torch.int64, device=logits.device)
    elif point.shape != lead:
        raise ValueError(f"{op}: point must have shape logits.shape[:-1] = {tuple(lead)}, got {tuple(point.shape)}")
    coef = torch.as_tensor(coef, device=logits.device)
    if coef.dim() < 1 or coef.shape[-1] != 3:
        raise ValueError(f"{op}: coef must be [..., 3], got shape {tuple(coef.shape)}")
    coef = _per_row(op, "coef", coef, lead + (3,), torch.float32, logits.device)
    token, stats = _ops.discrete_step(
        logits, point, coef, rule, float(temperature), bool(greedy), int(top_k), float(top_p), int(seed), int(offset)
    )
    if check:
        _raise_on_bad_rows(op, token, "NaN/+inf logits, a row without a finite logit, invalid coefficients "
                                      "(negative, NaN or infinite weights, all zero) or a negative point")  # fmt: skip
    return token, stats


def tweedie_step(
    log_score: Tensor,
    current: Tensor,
    e: Tensor | float,
    *,
    seed: int = 0,
    offset: int = 0,
    check: bool = True,
) -> Tensor:
    """Tweedie tau-leaping (SEDD "analytic" step, uniform process) for every row of ``log_score``.

    With ``s = exp(log_score)``, ``S = sum_z s_z``, N the vocabulary and ``e = exp(-(sigma_t - sigma_s))``, draws
    ``y`` from ``max(p, 0)``, ``p_y = [s_y / e + (e - 1) / (N e) S] [(1 - e) / N + e 1[y = x]]``; a row without
    positive mass keeps ``x``. Two passes per row (S is needed before the race).

    Args:
        log_score: ``[..., N]`` float32/float16/bfloat16 log concrete scores (N >= 2, last stride 1).
        current: int64 ``[...]`` = ``log_score.shape[:-1]``, the tokens x in [0, N).
        e: in (0, 1]: a float or a tensor broadcastable to ``log_score.shape[:-1]``.
        seed, offset, check: as in :func:`discrete_step`.

    Returns:
        token int64 ``[...]`` (-1 with ``check=False`` for rows that cannot be sampled). Not differentiable.
    """
    op = "tweedie_step"
    _check_seed_offset(op, seed, offset)
    lead = _check_rows(op, "log_score", log_score)
    if current.shape != lead:
        raise ValueError(f"{op}: current must have shape log_score.shape[:-1] = {tuple(lead)}, "
                         f"got {tuple(current.shape)}")  # fmt: skip
    if not isinstance(e, Tensor) and not 0 < e <= 1:
        raise ValueError(f"{op}: e = exp(-(sigma_t - sigma_s)) must be in (0, 1], got {e}")
    e = _per_row(op, "e", e, lead, torch.float32, log_score.device)
    token = _ops.tweedie_step(log_score, current, e, int(seed), int(offset))
    if check:
        _raise_on_bad_rows(op, token, "NaN/+inf scores, a row without a finite score, current outside [0, N) "
                                      "or e outside (0, 1]")  # fmt: skip
    return token


def select_positions(
    key: Tensor,
    eligible: Tensor,
    k: Tensor | int,
    *,
    threshold: Tensor | float | None = None,
    gumbel_tau: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> Tensor:
    """Per-row top-k position selection without host syncs (LLaDA / Fast-dLLM / informed-corrector commits).

    Row b selects the ``min(k[b], #eligible)`` eligible positions with the largest score, ``key / gumbel_tau + G``
    (Gumbel-top-k: a sample without replacement from ``softmax(key / gumbel_tau)``) or ``key`` when
    ``gumbel_tau == 0``; ties go to the lower index and NaN scores rank lowest. With ``threshold``, every eligible
    position with ``key >= threshold[b]`` (raw key) is selected as well (Fast-dLLM: ``k = 1`` plus a confidence
    threshold).

    Args:
        key: float32 ``[B, L]``. eligible: bool ``[B, L]``.
        k: an int >= 0 or an integer tensor ``[B]`` (negative entries count as 0).
        threshold: None, a float, or a float tensor ``[B]``.
        gumbel_tau: >= 0. seed, offset: as in :func:`discrete_step`.

    Returns:
        selected bool ``[B, L]``.
    """
    op = "select_positions"
    if not (math.isfinite(gumbel_tau) and gumbel_tau >= 0):
        raise ValueError(f"{op}: gumbel_tau must be finite and >= 0, got {gumbel_tau}")
    _check_seed_offset(op, seed, offset)
    if key.dim() != 2:
        raise ValueError(f"{op}: key must be [B, L], got shape {tuple(key.shape)}")
    if eligible.shape != key.shape:
        raise ValueError(f"{op}: eligible must have key's shape {tuple(key.shape)}, got {tuple(eligible.shape)}")
    rows = key.shape[:1]
    if isinstance(k, Tensor):
        if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise ValueError(f"{op}: k must be an integer tensor, got {k.dtype}")
    elif not isinstance(k, int) or k < 0:
        raise ValueError(f"{op}: k must be an int >= 0 or an integer tensor [B], got {k!r}")
    k = _per_row(op, "k", k, rows, torch.int64, key.device)
    if threshold is not None:
        threshold = _per_row(op, "threshold", threshold, rows, torch.float32, key.device)
    return _ops.select_positions(key, eligible, k, threshold, float(gumbel_tau), int(seed), int(offset))


# ---- fake kernels: shapes and dtypes only, so torch.compile(fullgraph=True) traces through ----


@torch.library.register_fake("difforge::discrete_step")
def _(logits, point, coef, rule, temperature, greedy, top_k, top_p, seed, offset):
    lead = logits.shape[:-1]
    return logits.new_empty(lead, dtype=torch.int64), logits.new_empty((*lead, len(STATS)), dtype=torch.float32)


@torch.library.register_fake("difforge::tweedie_step")
def _(log_score, current, e, seed, offset):
    return log_score.new_empty(log_score.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("difforge::select_positions")
def _(key, eligible, k, threshold, gumbel_tau, seed, offset):
    return key.new_empty(key.shape, dtype=torch.bool)


# ---- autograd: sampling is not differentiable; a backward through it is an error, not a silent zero ----

forbid_backward("difforge::discrete_step", "discrete_step is not differentiable (a sampling op)")
forbid_backward("difforge::tweedie_step", "tweedie_step is not differentiable (a sampling op)")
forbid_backward("difforge::select_positions", "select_positions is not differentiable (a selection op)")
