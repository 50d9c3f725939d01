"""Sequence parallelism on torch.distributed: Sparse Sequence Parallelism (SSP) and Ulysses.

SSP (OSP-Next; spec ``shared/spec/skiparse_ssp.md`` §6-§7) shards the Skiparse sparse layout
``[G * B, N'/G, ...]`` by whole sub-sequences: rank r of S (S | G, G = P^2 in 2D) holds rows
``[G_loc * B, N'/G, ...]``, G_loc = G / S. Attention inside a sparse block needs no communication, and the
token <-> group switch between blocks is ONE all_to_all, against the four of Ulysses (q, k, v, o).

API (all take ``group=None``: the default process group; without one, S = 1 and nothing is communicated):

* :func:`shard_sequence` / :func:`gather_sequence`: ``[B, N, ...]`` <-> contiguous shards ``[B, N/S, ...]``.
* :func:`ssp_enter` (shard -> local sparse rows), :func:`ssp_exit` (rows -> shard): full/sparse boundaries.
* :func:`ssp_switch`: token <-> group on the local rows, one all_to_all forward and one backward.
* :func:`ssp_attention`: attention on the local rows (per-sub-sequence key lengths, no communication).
* :func:`ulysses_attention`: the Ulysses baseline on sequence shards ``[B, N/S, H, D]``.
* :func:`count_comm` / :class:`CommCounter`: bytes sent off-rank per tag; :class:`CollectiveError`: a collective
  failed because a peer rank died or timed out.

Example (one sparse block pair, forward and backward, 4 processes)::

    # torchrun --nproc-per-node 4 my_script.py
    import torch, torch.distributed as dist
    from difforge.parallel import shard_sequence, ssp_enter, ssp_switch, ssp_attention, ssp_exit, count_comm

    dist.init_process_group("gloo")                          # "nccl" with one GPU per rank
    grid, P = (4, 32, 32), 2                                 # T, H, W after patchify; sparse ratio
    x = torch.randn(1, 4 * 32 * 32, 8, 64)                   # [B, N, heads, head_dim], same seed everywhere
    xs = ssp_enter(shard_sequence(x), grid, P, "token")      # [G_loc * B, N'/G, 8, 64]
    with count_comm() as counter:
        o = ssp_attention(xs, xs, xs, grid=grid, sparse_ratio=P, mode="token")
        o = ssp_switch(o, grid, P, "token")                  # now group mode: ONE all_to_all
        o = ssp_attention(o, o, o, grid=grid, sparse_ratio=P, mode="group")
    y = ssp_exit(o, grid, P, "group")                        # this rank's shard [B, N/S, 8, 64]
    print(counter.total_bytes("forward"))                    # B*N'*C/S * elsize * (S-1)/S

Benchmark of an SSP sparse block against the same block under Ulysses::

    torchrun --nproc-per-node 4 -m difforge.parallel.example --grid 4 32 32 --sparse-ratio 2
    python -m difforge.parallel.example --spawn 4            # same, spawning gloo processes itself
"""

from difforge.parallel.comm import CollectiveError, CommCounter, count_comm
from difforge.parallel.ssp import (
    gather_sequence,
    shard_sequence,
    ssp_attention,
    ssp_enter,
    ssp_exit,
    ssp_switch,
)
from difforge.parallel.ulysses import ulysses_attention

__all__ = [
    "CollectiveError",
    "CommCounter",
    "count_comm",
    "gather_sequence",
    "shard_sequence",
    "ssp_attention",
    "ssp_enter",
    "ssp_exit",
    "ssp_switch",
    "ulysses_attention",
]
