"""Discrete diffusion samplers: every standard masked and uniform sampler and the GADD Gibbs corrector, on the
fused sampling kernels of ``difforge.ops.sampling``.

Entry point :func:`sample`. The network is called as ``model(x_t [B, L] int64, alpha [B]) -> [B, L, N]``, alpha
the signal level of the forward process (masked: a token is still clean with probability alpha, else the mask
id; uniform: q(x_t = y | x0) = alpha 1[y = x0] + (1 - alpha)/N), so a network never depends on a sampler's time
parametrization. It returns log p(x0_i | x_t) (``model_output="denoiser"``), the leave-one-out posterior
(``"loo"``) or log concrete scores (``"score"``); the samplers convert exactly (``convert``).

Methods (options in each function's docstring):
  masked:  mdlm, first_hitting, remdm, confidence              (``masked.py``)
  uniform: euler, analytic, tau_leaping, ctmc_pc, informed_pc, gadd   (``uniform.py``)
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from difforge.samplers.discrete import masked, uniform
from difforge.samplers.discrete.context import Context, NotExact
from difforge.samplers.discrete.network import Network
from difforge.samplers.discrete.schedules import schedule as make_schedule
from difforge.samplers.discrete.steps import SampleChain

METHODS = {
    "masked": {
        "mdlm": masked.mdlm,
        "first_hitting": masked.first_hitting,
        "remdm": masked.remdm,
        "confidence": masked.confidence,
    },
    "uniform": {
        "euler": uniform.euler,
        "analytic": uniform.analytic,
        "tau_leaping": uniform.tau_leaping,
        "ctmc_pc": uniform.ctmc_pc,
        "informed_pc": uniform.informed_pc,
        "gadd": uniform.gadd,
    },
}
DEFAULT_METHOD = {"masked": "mdlm", "uniform": "euler"}

__all__ = ["METHODS", "NotExact", "initial_state", "method_function", "run", "sample"]


def method_function(process: str, method: str | None):
    """The sampler function of (process, method), with clear errors for unknown names."""
    if process not in METHODS:
        raise ValueError(f"process must be 'masked' or 'uniform', got {process!r}")
    method = method or DEFAULT_METHOD[process]
    if method not in METHODS[process]:
        other = "uniform" if process == "masked" else "masked"
        hint = f" ({method!r} is a {other} method)" if method in METHODS[other] else ""
        raise ValueError(f"unknown {process} method {method!r}{hint}; choose one of {sorted(METHODS[process])}")
    return METHODS[process][method]


def initial_state(shape: tuple[int, int], process: str, vocab_size: int, mask_id: int, seed: int, device) -> Tensor:
    """All masks, or uniform tokens (drawn on the CPU from the seed, so every device starts alike)."""
    if process == "masked":
        return torch.full(shape, mask_id, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, shape, generator=gen).to(device)


def run(fn, ctx: Context, options: dict) -> None:
    """Calls a method with its options; an option it does not take is a ValueError naming the ones it does."""
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        known = sorted(p for p in params if p != "ctx")
        raise ValueError(f"{fn.__name__}: unknown option(s) {unknown}; it takes {known}")
    if "seed" in params and "seed" not in options:
        options = {**options, "seed": ctx.chain.seed}
    fn(ctx, **options)


def sample(
    model,
    *,
    shape: tuple[int, int],
    vocab_size: int,
    process: str = "masked",
    method: str | None = None,
    steps: int = 64,
    schedule: str = "linear",
    seed: int = 0,
    model_output: str = "denoiser",
    mask_id: int | None = None,
    device: torch.device | str | None = None,
    return_nfe: bool = False,
    **method_options,
) -> Tensor | tuple[Tensor, int]:
    """Draws ``shape = (B, L)`` sequences of tokens in [0, vocab_size) from a discrete diffusion model.

    Args:
        model: ``model(x_t, alpha) -> [B, L, vocab_size]`` (see the module docstring).
        process: ``"masked"`` (absorbing; the mask id is ``vocab_size`` unless ``mask_id`` names a column of
            the model's vocabulary, which is then never drawn) or ``"uniform"``.
        method: masked: mdlm (default), first_hitting, remdm, confidence; uniform: euler (default), analytic,
            tau_leaping, ctmc_pc, informed_pc, gadd.
        steps: time steps (each method's docstring says how NFE follows from it).
        schedule: alpha(t): linear (alpha = 1 - t), cosine, loglinear, geometric.
        seed: every draw comes from Philox(seed): the same seed gives the same samples on CPU and CUDA.
        device: where x_t lives (default: the model's parameters' device, else CPU).
        return_nfe: also return the number of network calls.
        method_options: the method's keyword options (e.g. ``strategy="cap", eta=0.02`` for remdm,
            ``rounds=2, positions=12`` for gadd).

    Returns:
        LongTensor ``[B, L]`` (no mask ids), or ``(samples, nfe)``.
    """
    fn = method_function(process, method)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (batch, length) with both >= 1, got {tuple(shape)}")
    if mask_id is None:
        mask_id = vocab_size
    if process == "masked" and not 0 <= mask_id <= vocab_size:
        raise ValueError(f"mask_id must be in [0, vocab_size = {vocab_size}], got {mask_id}")
    if device is None:
        param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    if process == "masked" and mask_id < vocab_size:
        model = _never_draw(model, mask_id)
    net = Network(model, process=process, vocab_size=vocab_size, output=model_output)
    x = initial_state(tuple(shape), process, vocab_size, mask_id, seed, device)
    ctx = Context(net, SampleChain(x, seed), make_schedule(schedule), steps, vocab_size, mask_id)
    with torch.no_grad():
        run(fn, ctx, method_options)
    out = ctx.chain.x
    if process == "masked" and bool((out == mask_id).any()):
        raise RuntimeError(f"{fn.__name__} left mask tokens in its samples (a sampler bug)")
    return (out, net.nfe) if return_nfe else out


def _never_draw(model, column: int):
    """A model whose output column ``column`` (a mask id inside the vocabulary) can never be drawn."""

    def wrapped(x: Tensor, alpha: Tensor) -> Tensor:
        out = model(x, alpha)
        return out.index_fill(-1, torch.tensor([column], device=out.device), -torch.inf)

    return wrapped
