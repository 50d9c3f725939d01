"""TV and KL of every sampler against an exact oracle, as a function of NFE (spec §8).

A method whose steps all have exact kernels is propagated exactly (``law.LawChain``); the others (first
hitting, confidence ordering, informed position selection, ReMDM-conf) are run by Monte-Carlo with the fused
kernels and scored by the empirical law of their samples (TV bias about sqrt(M / samples)).
KL is KL(sampler law || target): finite because every oracle has full support.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from difforge.samplers.discrete import method_function, run, sample
from difforge.samplers.discrete.context import Context, NotExact
from difforge.samplers.discrete.metrics import empirical_law, kl_divergence, state_index, total_variation
from difforge.samplers.discrete.network import Network
from difforge.samplers.discrete.oracle.distributions import Oracle, OracleModel
from difforge.samplers.discrete.oracle.law import LawChain
from difforge.samplers.discrete.schedules import schedule as make_schedule


@dataclass(frozen=True)
class Variant:
    """A method with fixed options, under a display name."""

    name: str
    method: str
    options: dict = field(default_factory=dict)


SUITES = {
    "uniform": (
        Variant("euler", "euler"),
        Variant("analytic", "analytic"),
        Variant("tau_leaping", "tau_leaping"),
        Variant("ctmc_pc", "ctmc_pc"),
        Variant("informed_pc", "informed_pc", {"positions": 2}),
        Variant("gadd (1 site, exact)", "gadd", {"positions": 1, "select": "random", "rounds": 2}),
        Variant("gadd (2 random sites)", "gadd", {"positions": 2, "select": "random", "rounds": 2}),
        Variant("gadd (2 sites, margin)", "gadd", {"positions": 2, "rounds": 2}),
    ),
    "masked": (
        Variant("mdlm", "mdlm"),
        Variant("remdm (cap)", "remdm", {"strategy": "cap", "eta": 0.05}),
        Variant("remdm (loop)", "remdm", {"strategy": "loop", "eta": 0.05}),
        Variant("first_hitting", "first_hitting"),
        Variant("confidence", "confidence"),
    ),
}


@dataclass
class Entry:
    process: str
    variant: str
    steps: int
    nfe: int
    tv: float
    kl: float
    mode: str  # "exact" or "monte-carlo (S samples)"
    seconds: float


def _project_to_data(law: Tensor, oracle: Oracle, chain: LawChain) -> Tensor:
    """The law over data states (alphabet N) from one over alphabet N + 1 states without mask mass."""
    n = oracle.vocab_size
    clean = (chain.x < n).all(-1)
    out = torch.zeros(n**oracle.length, dtype=torch.float64, device=law.device)
    return out.index_add_(0, state_index(chain.x[clean], n), law[clean])


def exact_law(oracle: Oracle, process: str, variant: Variant, steps: int, schedule: str) -> tuple[Tensor, int]:
    """The sampler's exact output law over N^L and its NFE (raises NotExact when it has none)."""
    n, length = oracle.vocab_size, oracle.length
    alphabet = n + 1 if process == "masked" else n
    if process == "masked":
        init = torch.zeros(alphabet**length, dtype=torch.float64)
        init[-1] = 1.0  # the all-mask state, the largest index
    else:
        init = torch.full((alphabet**length,), 1.0 / alphabet**length, dtype=torch.float64)
    chain = LawChain(init, length, alphabet)
    net = Network(OracleModel(oracle, process), process=process, vocab_size=n, output="denoiser")
    ctx = Context(net, chain, make_schedule(schedule), steps, n, n)
    with torch.no_grad():
        run(method_function(process, variant.method), ctx, dict(variant.options))
    law = _project_to_data(chain.law, oracle, chain) if process == "masked" else chain.law
    return law, net.nfe


def monte_carlo_law(
    oracle: Oracle, process: str, variant: Variant, steps: int, schedule: str, samples: int, seed: int
) -> tuple[Tensor, int]:
    model = OracleModel(oracle, process)
    x, nfe = sample(
        model, shape=(samples, oracle.length), vocab_size=oracle.vocab_size, process=process, method=variant.method,
        steps=steps, schedule=schedule, seed=seed, return_nfe=True, **variant.options,
    )  # fmt: skip
    return empirical_law(x, oracle.vocab_size), nfe


def evaluate(
    oracle: Oracle,
    process: str,
    steps_list: list[int],
    *,
    variants: tuple[Variant, ...] | None = None,
    schedule: str = "linear",
    samples: int = 20000,
    max_monte_carlo_steps: int = 32,
    seed: int = 0,
    progress=None,
) -> list[Entry]:
    """Every variant at every step count: exact when possible, Monte-Carlo otherwise (up to
    ``max_monte_carlo_steps``: past that their TV is below the Monte-Carlo noise floor anyway)."""
    target = oracle.probs()
    entries = []
    for variant in variants or SUITES[process]:
        for steps in steps_list:
            start = time.perf_counter()
            try:
                law, nfe = exact_law(oracle, process, variant, steps, schedule)
                mode = "exact"
            except NotExact:
                if steps > max_monte_carlo_steps:
                    continue
                law, nfe = monte_carlo_law(oracle, process, variant, steps, schedule, samples, seed)
                mode = f"monte-carlo ({samples} samples)"
            entry = Entry(process, variant.name, steps, nfe, total_variation(law, target), kl_divergence(law, target),
                          mode, time.perf_counter() - start)  # fmt: skip
            entries.append(entry)
            if progress is not None:
                progress(entry)
    return entries


def as_records(entries: list[Entry]) -> list[dict]:
    return [asdict(e) for e in entries]
