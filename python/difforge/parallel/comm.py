"""The communication layer every difforge collective goes through.

Three things happen here and nowhere else:

* **Accounting.** Each collective records the bytes this rank sends off-rank into every active
  :class:`CommCounter` (``with count_comm() as counter: ...``), under a tag such as ``"ssp.switch"``. Backward
  collectives carry the forward tag plus ``".backward"``. Volumes follow the spec's convention
  (``shared/spec/skiparse_ssp.md`` §7): an equal-split all_to_all of ``numel`` elements sends
  ``numel * elsize * (S - 1) / S`` bytes off-rank, an all_gather of ``numel`` elements sends
  ``numel * elsize * (S - 1)``.
* **Failure reporting.** A collective that fails because a peer died (gloo "Connection closed by peer",
  "Connection reset by peer"), timed out, or raised a ``torch.distributed.DistError`` is re-raised as
  :class:`CollectiveError` naming the op, tag, rank and world size.
* **Autograd.** :func:`all_to_all` is differentiable: an equal-split all_to_all on a ``[S, ...]`` stack is
  its own inverse, so its backward is the same all_to_all on the gradient.

Without an initialised process group (or with a group of one rank) every function is the identity on a
single rank and nothing is recorded: single-process code runs the same code path.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CollectiveError",
    "CommCounter",
    "all_gather",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "count_comm",
    "group_rank",
    "group_size",
]

BACKWARD_SUFFIX = ".backward"


# ---- process-group helpers ----


def group_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (the default group when None); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank inside ``group``; 0 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("difforge.parallel: this process is not a member of the given process group")
    return rank


# ---- accounting ----


class CommCounter:
    """Bytes sent off-rank and number of collectives, per tag, recorded by this rank.

    ``bytes[tag]`` and ``calls[tag]`` are plain dicts; tags ending in ``".backward"`` were issued by a
    backward pass. :meth:`total_bytes` / :meth:`total_calls` sum them, optionally per phase and tag prefix.
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def record(self, tag: str, nbytes: int) -> None:
        self.bytes[tag] += int(nbytes)
        self.calls[tag] += 1

    def _tags(self, phase: str | None, prefix: str) -> list[str]:
        if phase not in (None, "forward", "backward"):
            raise ValueError(f'CommCounter: phase must be None, "forward" or "backward", got {phase!r}')
        tags = [t for t in self.calls if t.startswith(prefix)]
        if phase is not None:
            tags = [t for t in tags if t.endswith(BACKWARD_SUFFIX) == (phase == "backward")]
        return tags

    def total_bytes(self, phase: str | None = None, prefix: str = "") -> int:
        """Bytes over the tags starting with ``prefix``; ``phase`` "forward" / "backward" filters by tag."""
        return sum(self.bytes[t] for t in self._tags(phase, prefix))

    def total_calls(self, phase: str | None = None, prefix: str = "") -> int:
        """Collectives over the tags starting with ``prefix`` (see :meth:`total_bytes`)."""
        return sum(self.calls[t] for t in self._tags(phase, prefix))

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{tag: {"bytes": ..., "calls": ...}}`` (JSON-ready)."""
        return {t: {"bytes": self.bytes[t], "calls": self.calls[t]} for t in sorted(self.calls)}

    def __repr__(self) -> str:
        items = ", ".join(f"{t}: {self.bytes[t]} B / {self.calls[t]}" for t in sorted(self.calls))
        return f"CommCounter({items})"


# A process-wide stack, not thread-local: the autograd engine may run backward on another thread (CUDA).
_ACTIVE: list[CommCounter] = []
_LOCK = threading.Lock()


@contextlib.contextmanager
def count_comm(counter: CommCounter | None = None) -> Iterator[CommCounter]:
    """``with count_comm() as counter:`` records every difforge collective issued inside the block (forward
    and backward) into ``counter``. Nested blocks each see the collectives issued inside them."""
    counter = CommCounter() if counter is None else counter
    with _LOCK:
        _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        with _LOCK:
            _ACTIVE.remove(counter)


def _record(tag: str, nbytes: int) -> None:
    with _LOCK:
        for counter in _ACTIVE:
            counter.record(tag, nbytes)


# ---- failure reporting ----


class CollectiveError(RuntimeError):
    """A collective failed, most likely because a peer rank died or the process-group timeout expired.

    Attributes: ``op``, ``tag``, ``rank`` and ``world_size`` (inside the collective's group); the backend's
    exception is ``__cause__``."""

    def __init__(self, op: str, tag: str, rank: int, world_size: int, cause: BaseException) -> None:
        self.op, self.tag, self.rank, self.world_size = op, tag, rank, world_size
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        where = f"rank {rank} of world size {world_size}"
        if dist.is_initialized() and dist.get_rank() != rank:
            where += f" (global rank {dist.get_rank()})"
        super().__init__(
            f"difforge.parallel: collective {op} (tag {tag!r}) failed on {where}: "
            "a peer rank probably died (crashed, was killed or exited early) or the collective timed out "
            "(process-group timeout); check the other ranks' logs. Backend error: "
            f"{type(cause).__name__}: {detail}"
        )


# Backend messages of a lost peer or an expired timeout (gloo: "Connection closed by peer", "Connection reset by
# peer", "Timed out waiting ...ms"; NCCL: watchdog / "NCCL error"). Other RuntimeErrors (bad shapes) pass through.
_FAILURE = re.compile(
    r"connection (closed|reset|refused)|closed by peer|reset by peer|broken pipe|timed out|timeout|"
    r"socket|nccl error|watchdog|aborted|peer",
    re.IGNORECASE,
)


def _is_collective_failure(err: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and bool(_FAILURE.search(str(err)))


def _run(op: str, tag: str, group: dist.ProcessGroup | None, fn) -> None:
    try:
        fn()
    except CollectiveError:
        raise
    except RuntimeError as err:
        if not _is_collective_failure(err):
            raise
        raise CollectiveError(op, tag, group_rank(group), group_size(group), err) from err


# ---- collectives ----


def all_to_all_single(x: Tensor, *, group: dist.ProcessGroup | None = None, tag: str = "all_to_all") -> Tensor:
    """Equal-split all_to_all on dim 0: ``x [S * k, ...]`` -> ``[S * k, ...]`` where slice ``j`` of the input
    goes to rank ``j`` and slice ``i`` of the output came from rank ``i``. Not differentiable (see
    :func:`all_to_all`). Records ``numel * elsize * (S - 1) / S`` bytes under ``tag``."""
    size = group_size(group)
    if size == 1:
        return x
    if x.dim() == 0 or x.shape[0] % size != 0:
        raise ValueError(
            f"all_to_all_single ({tag}): dim 0 of the input must be a multiple of the group size {size} "
            f"(equal splits), got shape {tuple(x.shape)}"
        )
    x = x.contiguous()
    out = torch.empty_like(x)
    _record(tag, x.numel() * x.element_size() * (size - 1) // size)
    _run("all_to_all_single", tag, group, lambda: dist.all_to_all_single(out, x, group=group))
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, tag: str) -> Tensor:
        ctx.group, ctx.tag = group, tag
        return all_to_all_single(x, group=group, tag=tag)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # out[i] on rank r = x[r] on rank i, so grad_x[j] on rank r = grad_out[r] on rank j: the same exchange.
        return all_to_all_single(grad, group=ctx.group, tag=ctx.tag + BACKWARD_SUFFIX), None, None


def all_to_all(x: Tensor, *, group: dist.ProcessGroup | None = None, tag: str = "all_to_all") -> Tensor:
    """Differentiable :func:`all_to_all_single` on ``x [S * k, ...]``; the backward is the same exchange of the
    gradient (recorded under ``tag + ".backward"``)."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, tag)


def _gather_into(out: Tensor, x: Tensor, group) -> None:
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated); gloo supports both on CPU.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def all_gather(x: Tensor, *, group: dist.ProcessGroup | None = None, tag: str = "all_gather") -> Tensor:
    """Every rank's ``x`` (same shape everywhere) stacked: ``[S, *x.shape]``, entry ``i`` from rank ``i``.
    Not differentiable. Records ``numel * elsize * (S - 1)`` bytes under ``tag``."""
    size = group_size(group)
    if size == 1:
        return x.unsqueeze(0)
    x = x.contiguous()
    flat = x.reshape(-1)
    # Concatenated form: gloo accepts only an output that concatenates the inputs on dim 0, not a stack.
    out = flat.new_empty((size * flat.numel(),))
    _record(tag, x.numel() * x.element_size() * (size - 1))
    _run("all_gather", tag, group, lambda: _gather_into(out, flat, group))
    return out.view(size, *x.shape)


def barrier(*, group: dist.ProcessGroup | None = None, tag: str = "barrier") -> None:
    """Waits for every rank of ``group`` (a call with 0 bytes is recorded); failures raise CollectiveError."""
    if group_size(group) == 1:
        return
    _record(tag, 0)
    _run("barrier", tag, group, lambda: dist.barrier(group=group))
