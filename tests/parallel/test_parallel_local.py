"""difforge.parallel in one process (no process group: S = 1) and the communication layer's bookkeeping.

The S = 1 path must be exactly the plain Skiparse ops (no communication recorded); the counter and the
failure classification are checked on synthetic inputs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from difforge.ops import (
    flash_attention,
    skiparse_rearrange,
    skiparse_seq_len,
    skiparse_seqlens,
    skiparse_switch,
)
from difforge.parallel import (
    CollectiveError,
    CommCounter,
    count_comm,
    gather_sequence,
    shard_sequence,
    ssp_attention,
    ssp_enter,
    ssp_exit,
    ssp_switch,
    ulysses_attention,
)
from difforge.parallel import comm

GRID, P = (2, 5, 6), 2


@pytest.fixture(autouse=True)
def _no_process_group():
    assert not dist.is_initialized(), "these tests need a process without a process group"


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dims", [1, 2])
def test_single_process_is_the_plain_ops(dims):
    x = _rand(2, 60, 3)
    with count_comm() as counter:
        a = ssp_enter(x, GRID, P, "token", dims=dims)
        b = ssp_switch(a, GRID, P, "token", dims=dims)
        y = ssp_exit(b, GRID, P, "group", dims=dims)
    assert torch.equal(a, skiparse_rearrange(x, GRID, P, "token", dims=dims))
    assert torch.equal(b, skiparse_rearrange(x, GRID, P, "group", dims=dims))
    assert torch.equal(y, x)
    assert counter.total_calls() == 0 and counter.total_bytes() == 0
    assert shard_sequence(x) is not x and torch.equal(shard_sequence(x), x)
    assert torch.equal(gather_sequence(x), x)


def test_single_process_gradients_are_the_plain_ops():
    x = _rand(2, 60, 3, seed=1).requires_grad_()
    w = _rand(8, skiparse_seq_len(GRID, P), 3, seed=2)
    (ssp_switch(ssp_enter(x, GRID, P, "token"), GRID, P, "token") * w).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (skiparse_switch(skiparse_rearrange(xr, GRID, P, "token"), GRID, P, "token") * w).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    gw = _rand(2, 60, 3, seed=3)
    rows = skiparse_rearrange(_rand(2, 60, 3, seed=4), GRID, P, "group").requires_grad_()
    (ssp_exit(rows, GRID, P, "group") * gw).sum().backward()
    assert torch.equal(rows.grad, skiparse_rearrange(gw, GRID, P, "group"))


def test_single_process_attention():
    q, k, v = (_rand(8, skiparse_seq_len(GRID, P), 2, 8, seed=s) for s in range(3))
    out = ssp_attention(q, k, v, grid=GRID, sparse_ratio=P, mode="group")
    ref = flash_attention(q, k, v, seqused_k=skiparse_seqlens(GRID, P, "group", batch=2))[0]
    assert torch.equal(out, ref)
    qd, kd, vd = (_rand(2, 60, 4, 8, seed=s) for s in range(3, 6))
    assert torch.equal(ulysses_attention(qd, kd, vd), flash_attention(qd, kd, vd)[0])


def test_counter_totals_phases_and_nesting():
    with count_comm() as outer:
        comm._record("ssp.switch", 100)
        with count_comm() as inner:
            comm._record("ssp.switch.backward", 40)
            comm._record("ulysses.q", 7)
    assert outer.total_bytes() == 147 and inner.total_bytes() == 47
    assert outer.total_bytes("forward") == 107 and outer.total_bytes("backward") == 40
    assert outer.total_bytes(prefix="ssp.") == 140 and outer.total_calls(prefix="ulysses") == 1
    assert outer.as_dict()["ssp.switch"] == {"bytes": 100, "calls": 1}
    comm._record("ignored", 1)  # no active counter: nothing recorded anywhere
    assert outer.total_calls() == 3
    with pytest.raises(ValueError, match="phase"):
        outer.total_bytes("sideways")
    counter = CommCounter()
    with count_comm(counter) as same:
        assert same is counter


@pytest.mark.parametrize(
    "message",
    [
        "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:11175",
        "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:36539: Connection reset by peer",
        "[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 4000ms for send operation to complete",
    ],
)
def test_backend_failures_become_collective_errors(message):
    def fail():
        raise RuntimeError(message)

    with pytest.raises(CollectiveError) as info:
        comm._run("all_to_all_single", "ssp.switch", None, fail)
    err = info.value
    assert isinstance(err, RuntimeError) and err.op == "all_to_all_single" and err.tag == "ssp.switch"
    assert "rank 0 of world size 1" in str(err) and "peer rank probably died" in str(err)
    assert "timed out" in str(err) and message.splitlines()[0] in str(err)
    assert err.__cause__ is not None


def test_dist_errors_become_collective_errors_and_others_pass_through():
    def dist_fail():
        raise dist.DistBackendError("NCCL communicator was aborted")

    with pytest.raises(CollectiveError, match="all_gather"):
        comm._run("all_gather", "ssp.exit", None, dist_fail)

    def shape_fail():
        raise RuntimeError("ProcessGroupGloo::allgather: invalid tensor size at index 0")

    with pytest.raises(RuntimeError, match="invalid tensor size") as info:
        comm._run("all_gather", "ssp.exit", None, shape_fail)
    assert not isinstance(info.value, CollectiveError)


def test_bad_inputs_single_process():
    rows = torch.zeros(4, skiparse_seq_len(GRID, P), 3)
    with pytest.raises(ValueError, match="mode must be"):
        ssp_switch(rows, GRID, P, "diagonal")
    with pytest.raises(ValueError, match="dims must be"):
        ssp_switch(rows, GRID, P, "token", dims=3)
    with pytest.raises(ValueError, match="grid must be"):
        ssp_switch(rows, (2, 5), P, "token")
    with pytest.raises(ValueError, match="sparse_ratio P must be >= 1"):
        ssp_switch(rows, GRID, 0, "token")
    with pytest.raises(ValueError, match=r"\[4 \* B, 32, \.\.\.\]"):
        ssp_switch(rows[:, :-1], GRID, P, "token")
    with pytest.raises(ValueError, match="x_shard"):
        ssp_enter(torch.zeros(1, 59, 3), GRID, P, "token")
    with pytest.raises(ValueError, match="k must be"):
        ssp_attention(rows[..., None], rows[:2, ..., None], rows[..., None], grid=GRID, sparse_ratio=P, mode="token")
    q = torch.zeros(1, 60, 2, 4)
    with pytest.raises(ValueError, match="needs grid"):
        ulysses_attention(q, q, q, sparse_ratio=2)
    with pytest.raises(ValueError, match="N = 64 tokens"):
        ulysses_attention(q, q, q, grid=(1, 8, 8), sparse_ratio=2)
    with pytest.raises(ValueError, match="v must be"):
        ulysses_attention(q, q, q[:, :-1])
