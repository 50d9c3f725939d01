"""sampling family: fused discrete-diffusion sampling steps against the PyTorch epilogues research code runs.

Ours: ``difforge.ops.sampling`` (imported on first use): ``discrete_step`` (one streaming pass per row of logits:
three-part mixture, Gumbel race, filters, row statistics), ``tweedie_step`` (two passes) and ``select_positions``,
all called with ``check=False`` where they have it (no host sync). Samplers, one case each (R = B * L rows):
  mdlm        MDLM ancestral step on masked rows: mixture (w_p, 0, w_d) per row, point = mask id V; every row is read
              (w_p > 0), w_p = (1/128) / t at per-row times t in [1/128, 1] (a 128-step schedule)
  sedd_euler  SEDD Euler, uniform process: rule "euler", c = dt * sigma'(t) / N (geometric sigma, t = 0.5, 1024 steps)
  gibbs_loo   Gibbs / informed-corrector conditional from LOO logits: mixture (alpha, 1 - alpha, 0), alpha in [0.2, 0.9]
  llada       LLaDA / Fast-dLLM: softmax sample of every row (T = 1) and its confidence p(token)
  topk_topp   AR-decoding-like top-k 50 + top-p 0.9 sampling, one row per sequence (rows = B)
  tweedie     SEDD analytic (Tweedie tau-leaping), uniform process, e = exp(-(sigma_t - sigma_s)) as for sedd_euler
  select      LLaDA low-confidence commit: per-row top-k of the confidence over the masked positions ([B, L])
Baselines: ``eager`` is the plain PyTorch composition of the reference code (MDLM ``_ddpm_update``, SEDD
``Euler``/``Analytic`` predictors with ``catsample``, rev_udm's fp64 Gibbs conditional, LLaDA's fp64
``add_gumbel_noise``, HF top-k/top-p warpers + vLLM's exponential race, LLaDA's per-row ``torch.topk`` loop);
``compile`` is torch.compile of that same function; ``flashinfer`` is FlashInfer's ``sampling_from_logits`` /
``top_k_top_p_sampling_from_logits`` (CUDA, when installed).

Byte model: the logits read once (R * V * element size) plus the per-row inputs and outputs of our op (point,
coefficients, token, statistics...); select: key, eligible and selected once. Every implementation is scored with
the same model, so a baseline's GB/s is effective bandwidth (the eager chains move 10-20x more bytes).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from difforge_bench.impls import FWD, compiled, timed
from difforge_bench.registry import Case, Family, Impl, Inputs, Shape, Unavailable

DTYPES = {"cpu": ("fp32", torch.float32), "cuda": ("bf16", torch.bfloat16)}
LOGIT_SCALE = 2.0  # logits ~ N(0, 4): a spread like a language model's
MDLM_STEPS = 128
SEDD_STEPS, SEDD_T, SIGMA_MIN, SIGMA_MAX = 1024, 0.5, 1e-4, 20.0
TOP_K, TOP_P = 50, 0.9
SELECT_MAX_K = 32  # tokens committed per row and step: k ~ U{1..32}
SEED = 0

SHAPES = (
    Shape("owt_32x1024", {"B": 32, "L": 1024, "V": 50_257}, "GPT-2 vocabulary, 32 x 1024 tokens (MDLM/SEDD on OWT)",
          ("cuda",)),  # fmt: skip
    Shape("llada_4x1024", {"B": 4, "L": 1024, "V": 126_464}, "LLaDA-8B vocabulary, 4 x 1024 tokens", ("cuda",)),
    Shape("cpu_16x64", {"B": 16, "L": 64, "V": 50_257}, "GPT-2 vocabulary, 1024 rows", ("cpu",)),
    Shape("cpu_64x64_v2048", {"B": 64, "L": 64, "V": 2048}, "small vocabulary, 4096 rows", ("cpu",)),
    Shape("smoke", {"B": 4, "L": 32, "V": 1000}, "smoke test", (), quick=True),
)


def _sedd_sigma_rate() -> tuple[float, float]:
    """(sigma'(t) * dt, sigma(t) - sigma(t - dt)) of the geometric schedule at SEDD_T, one of SEDD_STEPS steps."""
    dt = 1.0 / SEDD_STEPS
    sigma = lambda t: SIGMA_MIN ** (1 - t) * SIGMA_MAX**t  # noqa: E731
    return sigma(SEDD_T) * math.log(SIGMA_MAX / SIGMA_MIN) * dt, sigma(SEDD_T) - sigma(SEDD_T - dt)


# ---- per-row parameters (`same_rows`: one value for every row, for tests of the sampled law) ----


def _uniform(rows: int, low: float, high: float, gen: torch.Generator, device, same_rows: bool) -> Tensor:
    if same_rows:
        return torch.full((rows,), (low + high) / 2, device=device)
    return low + (high - low) * torch.rand(rows, generator=gen, device=device)


def _tokens(rows: int, vocab: int, gen: torch.Generator, device, same_rows: bool) -> Tensor:
    if same_rows:
        return torch.full((rows,), vocab // 3, dtype=torch.int64, device=device)
    return torch.randint(vocab, (rows,), generator=gen, device=device)


def _coef(*columns: Tensor) -> Tensor:
    return torch.stack([c.float() for c in columns], -1).contiguous()


def _mdlm_params(logits: Tensor, gen: torch.Generator, same_rows: bool = False) -> dict:
    rows, device = logits.shape[0], logits.device
    if same_rows:  # t = 2 / 128: half the rows unmask, half stay masked
        t = torch.full((rows,), 2 / MDLM_STEPS, device=device)
    else:
        t = _uniform(rows, 1 / MDLM_STEPS, 1.0, gen, device, False)
    w_p = (1 / MDLM_STEPS) / t  # (alpha_s - alpha_t) / (1 - alpha_t) with alpha = 1 - t, s = t - 1/128
    return {"w_p": w_p, "w_d": 1 - w_p, "coef": _coef(w_p, torch.zeros_like(w_p), 1 - w_p)}


def _sedd_euler_params(logits: Tensor, gen: torch.Generator, same_rows: bool = False) -> dict:
    rows, vocab, device = logits.shape[0], logits.shape[1], logits.device
    c = torch.full((rows,), _sedd_sigma_rate()[0] / vocab, device=device)
    zeros = torch.zeros_like(c)
    return {"current": _tokens(rows, vocab, gen, device, same_rows), "c": c, "coef": _coef(c, zeros, zeros)}


def _gibbs_loo_params(logits: Tensor, gen: torch.Generator, same_rows: bool = False) -> dict:
    rows, vocab, device = logits.shape[0], logits.shape[1], logits.device
    alpha = _uniform(rows, 0.2, 0.9, gen, device, same_rows).double()
    return {"current": _tokens(rows, vocab, gen, device, same_rows), "alpha": alpha,
            "coef": _coef(alpha, 1 - alpha, torch.zeros_like(alpha))}  # fmt: skip


def _softmax_params(logits: Tensor, gen: torch.Generator, same_rows: bool = False) -> dict:
    ones = torch.ones(logits.shape[0], device=logits.device)
    return {"coef": _coef(ones, torch.zeros_like(ones), torch.zeros_like(ones))}


def _tweedie_params(logits: Tensor, gen: torch.Generator, same_rows: bool = False) -> dict:
    rows, vocab, device = logits.shape[0], logits.shape[1], logits.device
    e = torch.full((rows,), math.exp(-_sedd_sigma_rate()[1]), device=device)
    return {"current": _tokens(rows, vocab, gen, device, same_rows), "e": e}


def _select_params(key: Tensor, gen: torch.Generator, same_rows: bool = False) -> dict:
    batch, device = key.shape[0], key.device
    eligible = torch.rand(key.shape, generator=gen, device=device) < 0.5
    eligible[:, :SELECT_MAX_K] = True  # k <= #eligible, so every implementation commits exactly k
    k = torch.randint(1, SELECT_MAX_K + 1, (batch,), generator=gen, device=device)
    return {"eligible": eligible, "k": k}


# ---- eager compositions (the reference code's epilogues) ----


def _gumbel64(like: Tensor) -> Tensor:
    """fp64 Gumbel noise -log(-log u), as MDLM / ReMDM / LLaDA draw it."""
    return -(-torch.rand_like(like, dtype=torch.float64).log()).log()


def _exponential_race(probs: Tensor) -> Tensor:
    """SEDD ``catsample``: argmax p / E with E = -log u (clamped away from 0 as SEDD does)."""
    return (probs / (1e-10 - (torch.rand_like(probs) + 1e-10).log())).argmax(-1)


def eager_mdlm(logits: Tensor, w_p: Tensor, w_d: Tensor) -> Tensor:
    """MDLM ``_ddpm_update`` on masked rows: q = [w_p * x_hat, w_d at the mask id V], fp64 Gumbel argmax."""
    x_hat = torch.log_softmax(logits.float(), -1).exp()
    q = torch.cat([x_hat * w_p[:, None], w_d[:, None]], -1).double()
    return (q.log() + _gumbel64(q)).argmax(-1)


def eager_sedd_euler(log_score: Tensor, current: Tensor, c: Tensor) -> Tensor:
    """SEDD Euler (uniform): jump w.p. W = min(c S', 1) to y ~ s_y / S' over y != x."""
    s = log_score.float().exp().scatter(-1, current[:, None], 0.0)
    total = s.sum(-1)
    jump = (c * total).clamp(max=1.0)
    y = _exponential_race(s / total[:, None])
    return torch.where(torch.rand_like(jump) < jump, y, current)


def eager_gibbs_loo(logits: Tensor, alpha: Tensor) -> Tensor:
    """rev_udm's Gibbs conditional in fp64: log(alpha softmax(l) + (1 - alpha) / N), then a Gumbel draw."""
    n = logits.shape[-1]
    log_alpha, log_floor = alpha.log()[:, None], ((1 - alpha) / n).log()[:, None]
    cond = torch.logaddexp(torch.log_softmax(logits.double(), -1) + log_alpha, log_floor)
    return (cond + _gumbel64(cond)).argmax(-1)


def eager_llada(logits: Tensor) -> tuple[Tensor, Tensor]:
    """LLaDA ``add_gumbel_noise`` (T = 1: exp(l) / (-log u) in fp64), argmax, confidence softmax(l)[token]."""
    l64 = logits.double()
    token = (l64.exp() / -torch.rand_like(l64).log()).argmax(-1)
    confidence = torch.softmax(logits.float(), -1).gather(-1, token[:, None])[:, 0]
    return token, confidence


def eager_topk_topp(logits: Tensor) -> Tensor:
    """HF TopK + TopP warpers (sort-based nucleus), then vLLM's race probs / Exp(1)."""
    l = logits.float()
    kth = torch.topk(l, TOP_K, dim=-1).values[:, -1:]
    l = l.masked_fill(l < kth, float("-inf"))
    ascending, order = torch.sort(l, dim=-1)
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - TOP_P
    drop[:, -1] = False
    l = l.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = l.softmax(-1)
    return probs.div(torch.empty_like(probs).exponential_()).argmax(-1)


def eager_tweedie(log_score: Tensor, current: Tensor, e: Tensor) -> Tensor:
    """SEDD ``AnalyticPredictor`` (uniform): staggered score times the transposed transition, ``catsample``."""
    n = log_score.shape[-1]
    score, e = log_score.float().exp(), e[:, None]
    staggered = (e - 1) / (n * e) * score.sum(-1, keepdim=True) + score / e
    transition = ((1 - e) / n).expand_as(score).scatter_add(-1, current[:, None], e)
    return _exponential_race(staggered * transition)


def eager_select(key: Tensor, eligible: Tensor, k: Tensor) -> Tensor:
    """LLaDA's commit: a Python loop of torch.topk per row over the confidence (-inf where not eligible)."""
    confidence = torch.where(eligible, key, float("-inf"))
    selected = torch.zeros_like(eligible)
    for b in range(confidence.shape[0]):
        _, index = torch.topk(confidence[b], k=int(k[b]))
        selected[b, index] = True
    return selected


# ---- our op, per sampler ----


def _sampling():
    return importlib.import_module("difforge.ops.sampling")


def _ours_mdlm(i: Inputs):
    return _sampling().discrete_step(i["logits"], i["logits"].shape[-1], i["coef"], seed=SEED, check=False)


def _ours_sedd_euler(i: Inputs):
    return _sampling().discrete_step(i["logits"], i["current"], i["coef"], rule="euler", seed=SEED, check=False)


def _ours_gibbs_loo(i: Inputs):
    return _sampling().discrete_step(i["logits"], i["current"], i["coef"], seed=SEED, check=False)


def _ours_llada(i: Inputs):
    token, stats = _sampling().discrete_step(i["logits"], i["logits"].shape[-1], i["coef"], seed=SEED, check=False)
    return token, stats[:, 0].exp()


def _ours_topk_topp(i: Inputs):
    return _sampling().discrete_step(i["logits"], i["logits"].shape[-1], i["coef"], top_k=TOP_K, top_p=TOP_P,
                                     seed=SEED, check=False)  # fmt: skip


def _ours_tweedie(i: Inputs):
    return _sampling().tweedie_step(i["logits"], i["current"], i["e"], seed=SEED, check=False)


def _ours_select(i: Inputs):
    return _sampling().select_positions(i["key"], i["eligible"], i["k"], seed=SEED)


# ---- samplers ----


@dataclass(frozen=True)
class Sampler:
    name: str
    op: str
    params: Callable[..., dict]  # (logits or key, generator, same_rows) -> the per-row inputs
    ours: Callable[[Inputs], object]
    eager: Callable[..., object]
    eager_args: tuple[str, ...]  # the inputs eager (and compile) take, in order
    row_bytes: int  # bytes per row that our op reads or writes besides the logits
    flashinfer: str | None = None  # the flashinfer.sampling function of the same law
    decode: bool = False  # one row per sequence (B rows), not per token


STEP_ROW_BYTES = 8 + 12 + 8 + 20  # point, coef, token, stats
SAMPLERS = {
    s.name: s
    for s in (
        Sampler("mdlm", "discrete_step", _mdlm_params, _ours_mdlm, eager_mdlm, ("logits", "w_p", "w_d"),
                STEP_ROW_BYTES),
        Sampler("sedd_euler", "discrete_step", _sedd_euler_params, _ours_sedd_euler, eager_sedd_euler,
                ("logits", "current", "c"), STEP_ROW_BYTES),
        Sampler("gibbs_loo", "discrete_step", _gibbs_loo_params, _ours_gibbs_loo, eager_gibbs_loo, ("logits", "alpha"),
                STEP_ROW_BYTES),
        Sampler("llada", "discrete_step", _softmax_params, _ours_llada, eager_llada, ("logits",), STEP_ROW_BYTES,
                flashinfer="sampling_from_logits"),
        Sampler("topk_topp", "discrete_step", _softmax_params, _ours_topk_topp, eager_topk_topp, ("logits",),
                STEP_ROW_BYTES, flashinfer="top_k_top_p_sampling_from_logits", decode=True),
        Sampler("tweedie", "tweedie_step", _tweedie_params, _ours_tweedie, eager_tweedie, ("logits", "current", "e"),
                8 + 4 + 8),  # current, e, token
        Sampler("select", "select_positions", _select_params, _ours_select, eager_select, ("key", "eligible", "k"), 8),
    )
}  # fmt: skip


def rows_of(sampler: Sampler, shape: Shape) -> int:
    """Rows of logits a case samples: B * L, or B for one-row-per-sequence decoding."""
    d = shape.dims
    return d["B"] if sampler.decode else d["B"] * d["L"]


def bytes_moved(sampler: Sampler, shape: Shape, elem_size: int) -> int:
    """The byte model: logits once plus per-row inputs and outputs (select: key, eligible, selected once)."""
    d = shape.dims
    if sampler.name == "select":
        return d["B"] * d["L"] * (4 + 1 + 1) + d["B"] * sampler.row_bytes  # key, eligible, selected; k
    rows = rows_of(sampler, shape)
    return rows * d["V"] * elem_size + rows * sampler.row_bytes


def make_inputs_for(sampler: Sampler, x: Tensor, gen: torch.Generator, same_rows: bool = False) -> dict:
    """The inputs of every implementation: the logits (or select's key) x and the sampler's per-row parameters."""
    return {("key" if sampler.name == "select" else "logits"): x, **sampler.params(x, gen, same_rows)}


def _make_inputs(sampler: Sampler, shape: Shape, dtype: torch.dtype):
    d = shape.dims

    def make(device: str) -> dict:
        gen = torch.Generator(device=device).manual_seed(0)
        if sampler.name == "select":
            x = torch.rand((d["B"], d["L"]), generator=gen, device=device)  # confidences
        else:
            size = (rows_of(sampler, shape), d["V"])
            x = (LOGIT_SCALE * torch.randn(size, generator=gen, device=device)).to(dtype)
        return make_inputs_for(sampler, x, gen)

    return make


# ---- implementations ----


def eager_forward(sampler: Sampler):
    """The sampler's eager composition as a function of the case inputs."""
    fn = sampler.eager
    return lambda i: fn(*(i[name] for name in sampler.eager_args))


def _ours(sampler: Sampler) -> Impl:
    def build(inputs: Inputs):
        _sampling()  # ImportError here: the runner reports ours as unavailable, the baselines still run
        return timed(sampler.ours, FWD)(inputs)

    return build


def _compile(sampler: Sampler) -> Impl | Unavailable:
    if sampler.name == "select":
        return Unavailable("a Python loop over rows with data-dependent k: nothing for torch.compile to fuse")
    return compiled(eager_forward(sampler), FWD)


def _flashinfer(sampler: Sampler, device: str) -> Impl | Unavailable:
    if device != "cuda":
        return Unavailable("CUDA only")
    if importlib.util.find_spec("flashinfer") is None:
        return Unavailable("flashinfer not installed")
    args = (TOP_K, TOP_P) if sampler.flashinfer == "top_k_top_p_sampling_from_logits" else ()

    def build(inputs: Inputs):
        fn = getattr(importlib.import_module("flashinfer.sampling"), sampler.flashinfer)
        logits = inputs["logits"]
        try:
            fn(logits, *args)
        except (RuntimeError, ValueError, TypeError):  # a dtype its kernels do not take: an fp32 copy, untimed
            logits = logits.float()
        return lambda: fn(logits, *args)

    return build


def _case(device: str, shape: Shape, sampler: Sampler) -> Case:
    dtype_name, dtype = DTYPES[device]
    baselines: dict[str, Impl | Unavailable] = {"eager": timed(eager_forward(sampler), FWD),
                                                "compile": _compile(sampler)}  # fmt: skip
    if sampler.flashinfer:
        baselines["flashinfer"] = _flashinfer(sampler, device)
    return Case(
        op=sampler.op,
        mode=FWD,
        config={"sampler": sampler.name, "dtype": "fp32" if sampler.name == "select" else dtype_name},
        shape=shape,
        make_inputs=_make_inputs(sampler, shape, dtype),
        ours=_ours(sampler),
        baselines=baselines,
        bytes_moved=bytes_moved(sampler, shape, dtype.itemsize),
    )


def cases(device: str, shape: Shape) -> list[Case]:
    """One case per sampler on this (device, shape)."""
    return [_case(device, shape, sampler) for sampler in SAMPLERS.values()]


FAMILY = Family(
    name="sampling",
    summary="fused discrete-diffusion sampling steps: discrete_step, tweedie_step, select_positions",
    shapes=SHAPES,
    cases=cases,
    notes=(
        "GB/s from the one-read byte model (logits once + per-row inputs/outputs) for every implementation",
        "rows R = B*L, except topk_topp (B rows: one per sequence); select works on [B, L] confidences",
        "flashinfer: logits as given, or an fp32 copy made before timing where its kernels reject the dtype",
    ),
)
