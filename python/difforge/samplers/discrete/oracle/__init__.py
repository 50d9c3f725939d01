"""Exact oracles for evaluating discrete samplers (spec §8): known laws with exact noisy posteriors, and the
wrapper that serves them to a sampler as a network."""

from difforge.samplers.discrete.oracle.distributions import (
    HMM,
    Enumerated,
    Grid2D,
    MarkovChain,
    Oracle,
    OracleModel,
    Potts,
    Product,
    oracle_by_name,
)

__all__ = [
    "HMM",
    "Enumerated",
    "Grid2D",
    "MarkovChain",
    "Oracle",
    "OracleModel",
    "Potts",
    "Product",
    "oracle_by_name",
]
