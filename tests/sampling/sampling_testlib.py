"""Test library of the sampling family (spec discrete_samplers.md §3, §6; math in cpp/include/difforge/sampling.h).

Plain numpy / PyTorch references written from the spec, never calling difforge:

* ``philox_words(seed, offset, rows, stream, cols)``: the Philox words ``draw_word`` of the header, from the formats
  testlib's numpy Philox4x32-10 with counter ``(col >> 2, row, stream, offset)``, key ``(seed lo, seed hi)``, word
  ``col & 3``; ``gumbel64`` (fp64 noise from those words), ``uniform01``, ``index_below``.
* ``ref_discrete_step``: every rule in fp64 from the same words: mixture weights, component draw, the filters (sort +
  cumsum), the race, the uniform index, and the statistics (``torch.logsumexp``, softmax entropy, ``torch.topk``).
  ``ref_step_law``: the exact law of one row's token (for chi-square tests).
* ``ref_tweedie_step`` / ``ref_tweedie_law``: the Tweedie tau-leaping masses and race.
* ``ref_select_positions``: per-row stable sort of the scores (NaN lowest) + threshold.
* ``top_p_ambiguous_rows``: rows whose nucleus boundary is decided by fp32 rounding (excluded from bit-equality).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "formats"))
from formats_testlib import philox4x32_10  # noqa: E402  (the one numpy Philox of the test suite)

GUMBEL_STREAM, COMPONENT_STREAM, UNIFORM_STREAM, POSITION_STREAM = 0, 1, 2, 3
RULES = ("mixture", "euler", "tau_leap", "ctmc")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK32 = 0xFFFFFFFF


def philox_words(seed: int, offset: int, rows, stream: int, cols) -> np.ndarray:
    """``draw_word(seed, offset, row, stream, col)`` for every (row, col): a uint64 array ``[len(rows), len(cols)]``
    of 32-bit words. One Philox block per 4 columns, as the kernels compute them."""
    rows = np.asarray(rows, dtype=np.uint64).reshape(-1)
    cols = np.asarray(cols, dtype=np.uint64).reshape(-1)
    blocks = np.arange(int(cols.max()) // 4 + 1 if cols.size else 0, dtype=np.uint64)
    r, b = np.meshgrid(rows, blocks, indexing="ij")
    ctr = (b, r, np.full_like(b, stream), np.full_like(b, offset & _MASK32))
    out = np.stack(philox4x32_10(ctr, (seed & _MASK32, seed >> 32)), axis=-1)  # [rows, blocks, 4]
    flat = out.reshape(len(rows), -1)
    return flat[:, cols.astype(np.int64)]


def gumbel64(words: np.ndarray) -> np.ndarray:
    """G = -log E, E = -log1p(-v), v = (w + 1/2) 2^-32, in fp64 (the header's formula without fp32 rounding)."""
    v = (words.astype(np.float64) + 0.5) * 2.0**-32
    return -np.log(-np.log1p(-v))


def uniform01(words: np.ndarray) -> np.ndarray:
    """(w >> 8) 2^-24, exact in fp64 and fp32."""
    return (words >> np.uint64(8)).astype(np.float64) * 2.0**-24


def index_below(words: np.ndarray, n) -> np.ndarray:
    """(w n) >> 32: an index in [0, n)."""
    return ((words.astype(object) * np.asarray(n, dtype=object)) >> 32).astype(np.int64)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [R, V] fp64 holding exactly the values the kernels read."""
    return logits.detach().cpu().float().reshape(-1, logits.shape[-1]).double()


def ref_stats(l: torch.Tensor) -> torch.Tensor:
    """[R, V] fp64 -> [R, 5] (NaN logp column, lse, entropy, top1, top2) over the raw logits."""
    lse = torch.logsumexp(l, -1)
    logp = l - lse[:, None]
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    top = torch.topk(l, 2, dim=-1).values
    return torch.stack([torch.full_like(lse, math.nan), lse, entropy, top[:, 0], top[:, 1]], -1)


def ref_weights(rule: str, coef: torch.Tensor, log_s_excl: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, 3] fp64 weights (w_p, w_u, w_d) of the rule; NaN rows for invalid rate factors."""
    if rule == "mixture":
        return coef.clone()
    c = coef[:, 0]
    s = log_s_excl.exp()
    zero = torch.zeros_like(c)

    def one_jump(lam):
        return torch.where((lam > 0) & torch.isfinite(lam), lam * torch.exp(-lam), zero)

    if rule == "euler":
        w = torch.where(c > 0, torch.clamp(c * s, max=1.0), zero)
        out = torch.stack([w, zero, 1 - w], -1)
    elif rule == "tau_leap":
        j = torch.where(c > 0, one_jump(c * s), zero)
        out = torch.stack([j, zero, 1 - j], -1)
    else:
        others = float(vocab - 1)
        j = torch.where(c > 0, one_jump(c * (s + others)), zero)
        share = torch.where(torch.isfinite(s), s / (s + others), torch.ones_like(s))
        out = torch.stack([j * share, j * (1 - share), 1 - j], -1)
    invalid = ~((c >= 0) & torch.isfinite(c))
    return torch.where(invalid[:, None], torch.full_like(out, math.nan), out)


def weights_valid(w: torch.Tensor) -> torch.Tensor:
    total = w.sum(-1)
    return (w >= 0).all(-1) & (total > 0) & torch.isfinite(total)


def ref_filter(l: torch.Tensor, top_k: int, top_p: float, temperature: float) -> torch.Tensor:
    """[R, V] bool: the columns the top-k / top-p filters keep (ties kept), by sort + cumsum."""
    R, V = l.shape
    keep = torch.ones_like(l, dtype=torch.bool)
    if 0 < top_k < V:
        kth = torch.sort(l, -1, descending=True).values[:, top_k - 1]
        keep &= l >= kth[:, None]
    if top_p < 1:
        scaled = torch.where(keep, l / temperature, torch.full_like(l, -math.inf))
        p = torch.softmax(scaled, -1)
        order = torch.sort(scaled, -1, descending=True)
        mass = torch.gather(p, -1, order.indices).cumsum(-1)
        first = (mass >= top_p).float().argmax(-1)  # the first prefix holding top_p of the mass
        thr = torch.gather(l, -1, torch.gather(order.indices, -1, first[:, None]))
        keep &= l >= thr
    return keep


def top_p_ambiguous_rows(logits, top_k: int, top_p: float, temperature: float, tol: float = 2e-5) -> torch.Tensor:
    """[...] bool: rows whose top-p boundary is within tol of a cumulative mass (renormalized to 1). There the kept
    set depends on fp32 summation order (the kernels' float / fixed-point sums vs the fp64 reference), so draws may
    legitimately differ; everywhere else they must not."""
    lead = logits.shape[:-1]
    if top_p >= 1:
        return torch.zeros(lead, dtype=torch.bool)
    l = _rows(logits)
    l = torch.where(torch.isfinite(l), l, torch.full_like(l, -math.inf))
    kept = ref_filter(l, top_k, 1.0, temperature)
    scaled = torch.where(kept, l / temperature, torch.full_like(l, -math.inf))
    mass = torch.sort(torch.softmax(scaled, -1), -1, descending=True).values.cumsum(-1)
    return ((mass - top_p).abs() < tol).any(-1).reshape(lead)


def _components(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    x = u * weights.sum(-1)
    return torch.where(x < weights[:, 0], 0, torch.where(x < weights[:, 0] + weights[:, 1], 1, 2))


def ref_discrete_step(logits, point, coef, *, rule="mixture", temperature=1.0, greedy=False, top_k=0, top_p=1.0,
                      seed=0, offset=0):  # fmt: skip
    """(token int64 [...], stats fp32 [..., 5]) of discrete_step, in fp64 from the same Philox words."""
    lead, V = logits.shape[:-1], logits.shape[-1]
    l = _rows(logits)
    R = l.shape[0]
    d = torch.as_tensor(point).expand(lead).reshape(-1).cpu().long()
    coef = torch.as_tensor(coef).expand(*lead, 3).reshape(-1, 3).cpu().double()
    rows = np.arange(R)
    u = torch.from_numpy(uniform01(philox_words(seed, offset, rows, COMPONENT_STREAM, [0])[:, 0]))
    uniform_word = philox_words(seed, offset, rows, UNIFORM_STREAM, [0])[:, 0]
    noise = torch.from_numpy(gumbel64(philox_words(seed, offset, rows, GUMBEL_STREAM, np.arange(V))))

    cols = torch.arange(V)
    in_range = (d >= 0) & (d < V)
    exclude = (rule != "mixture") & in_range
    is_point = exclude[:, None] & (cols[None, :] == d[:, None])
    read = torch.ones(R, dtype=torch.bool) if rule != "mixture" else coef[:, 0] > 0
    bad = (torch.isnan(l) | (l == math.inf)).any(-1) | ~(l > -math.inf).any(-1)
    clean = torch.where(bad[:, None], torch.zeros_like(l), l)  # keeps NaN out of the references below
    log_s_excl = torch.logsumexp(torch.where(is_point, torch.full_like(l, -math.inf), clean), -1)
    weights = ref_weights(rule, coef, log_s_excl, V)
    valid = weights_valid(weights) & ~(read & bad)
    component = _components(torch.nan_to_num(weights, nan=0.0), u)

    allowed = ref_filter(clean, top_k, top_p, temperature) & ~is_point & (clean > -math.inf)
    key = clean if greedy else clean / temperature + noise
    key = torch.where(allowed, key, torch.full_like(key, -math.inf))
    winner = torch.where(allowed.any(-1), key.argmax(-1), d)

    n_uniform = torch.where(exclude, V - 1, V).numpy()
    y = torch.from_numpy(index_below(uniform_word, n_uniform))
    uniform = torch.where(exclude & (y >= d), y + 1, y)
    token = torch.where(component == 0, winner, torch.where(component == 1, uniform, d))
    token = torch.where(valid, token, -1)

    stats = ref_stats(clean)
    safe = token.clamp(0, V - 1)
    logp = torch.gather(clean, -1, safe[:, None])[:, 0] - stats[:, 1]
    stats[:, 0] = torch.where((token >= 0) & (token < V), logp, math.nan)
    stats[~(read & valid & (token >= 0))] = math.nan
    return token.reshape(lead), stats.float().reshape(*lead, 5)


def ref_step_law(logits_row, point: int, coef, *, rule="mixture", temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """The exact law of one row's token as probabilities over [0, V] (entry V: the point when it lies outside
    [0, V)), in fp64."""
    l = _rows(logits_row.reshape(1, -1))
    V = l.shape[1]
    coef = torch.as_tensor(coef, dtype=torch.float64).reshape(1, 3)
    cols = torch.arange(V)
    in_range = 0 <= point < V
    exclude = rule != "mixture" and in_range
    is_point = (cols == point) & exclude
    log_s_excl = torch.logsumexp(torch.where(is_point, -math.inf, l[0]), -1).reshape(1)
    w = ref_weights(rule, coef, log_s_excl, V)[0]
    w = w / w.sum()
    law = torch.zeros(V + 1, dtype=torch.float64)
    allowed = ref_filter(l, top_k, top_p, temperature)[0] & ~is_point & (l[0] > -math.inf)
    point_slot = point if in_range else V
    if allowed.any():
        law[:V] += w[0] * torch.softmax(torch.where(allowed, l[0] / temperature, -math.inf), -1)
    else:
        law[point_slot] += w[0]
    uniform = torch.ones(V, dtype=torch.float64)
    if exclude:
        uniform[point] = 0
    law[:V] += w[1] * uniform / uniform.sum()
    law[point_slot] += w[2]
    return law.numpy()


def _tweedie_mass(l: torch.Tensor, current: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """[R, V] fp64 masses p_y (may be negative) scaled by exp(-max l)."""
    V = l.shape[1]
    s = (l - l.max(-1, keepdim=True).values).exp()
    z = s.sum(-1, keepdim=True)
    e = e[:, None]
    score = s / e + (e - 1) / (V * e) * z
    is_current = torch.arange(V)[None, :] == current[:, None]
    return score * ((1 - e) / V + torch.where(is_current, e, torch.zeros_like(e)))


def ref_tweedie_step(log_score, current, e, *, seed=0, offset=0) -> torch.Tensor:
    """tweedie_step's tokens in fp64 from the same Philox words."""
    lead, V = log_score.shape[:-1], log_score.shape[-1]
    l = _rows(log_score)
    R = l.shape[0]
    x = torch.as_tensor(current).reshape(-1).cpu().long()
    e = torch.as_tensor(e, dtype=torch.float64).expand(lead).reshape(-1)
    noise = torch.from_numpy(gumbel64(philox_words(seed, offset, np.arange(R), GUMBEL_STREAM, np.arange(V))))
    bad = (torch.isnan(l) | (l == math.inf)).any(-1) | ~(l > -math.inf).any(-1)
    bad |= (x < 0) | (x >= V) | ~((e > 0) & (e <= 1))
    clean = torch.where(bad[:, None], torch.zeros_like(l), l)
    mass = _tweedie_mass(clean, x.clamp(0, V - 1), torch.where(bad, 0.5, e))
    key = torch.where(mass > 0, mass.clamp_min(1e-300).log() + noise, torch.full_like(mass, -math.inf))
    token = torch.where((mass > 0).any(-1), key.argmax(-1), x)
    return torch.where(bad, -1, token).reshape(lead)


def ref_tweedie_law(log_score_row, current: int, e: float) -> np.ndarray:
    """The exact law of one row's Tweedie token: max(p, 0) normalized (or the point mass on current)."""
    l = _rows(log_score_row.reshape(1, -1))
    mass = _tweedie_mass(l, torch.tensor([current]), torch.tensor([e], dtype=torch.float64))[0].clamp_min(0)
    if mass.sum() == 0:
        mass[current] = 1
    return (mass / mass.sum()).numpy()


def ref_select_positions(key, eligible, k, *, threshold=None, gumbel_tau=0.0, seed=0, offset=0) -> torch.Tensor:
    """Per row: the min(k, #eligible) eligible positions with the largest score (stable sort: ties to the lower
    index; NaN below -inf), united with {eligible, key >= threshold}."""
    key = key.detach().cpu().double()
    eligible = eligible.cpu()
    B, L = key.shape
    k = torch.as_tensor(k).expand(B)
    score = key
    if gumbel_tau > 0:
        noise = torch.from_numpy(gumbel64(philox_words(seed, offset, np.arange(B), POSITION_STREAM, np.arange(L))))
        score = key / gumbel_tau + noise
    # rank order: numbers, then -inf, then NaN
    rank = torch.where(torch.isnan(score), -math.inf, torch.where(score == -math.inf, -1e300, score))
    selected = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        idx = torch.nonzero(eligible[b]).reshape(-1)
        order = torch.sort(rank[b, idx], descending=True, stable=True).indices
        take = idx[order[: max(int(k[b]), 0)]]
        selected[b, take] = True
    if threshold is not None:
        thr = torch.as_tensor(threshold, dtype=torch.float64).expand(B)
        selected |= eligible & (key >= thr[:, None])
    return selected
