"""torch.library.opcheck of the five Skiparse ops (schema, autograd registration, fake kernels, AOT dispatch with
dynamic shapes) through tests/opcheck.py::run_opcheck, on torch.ops.difforge.<op>.default with the raw schema
arguments (bindings/schemas.cpp), and torch.autograd.gradcheck / gradgradcheck in float64 of the differentiable ones.

skiparse_rearrange / restore / switch are differentiable: their inputs require grad. skiparse_exchange_send /
receive forbid backward (difforge.ops._autograd.forbid_backward raises when a backward reaches them), so, as for the
inference-only kvcache ops (tests/kvcache/test_kv_opcheck.py), they get every utility on inputs that do not require
grad, and test_schema + test_autograd_registration on inputs that do (test_aot_dispatch_dynamic would run the
forbidden backward).
"""

from __future__ import annotations

import pytest
import torch

from opcheck import run_opcheck
from skiparse_testlib import groups, random_tensor, seq_len

difforge = pytest.importorskip("difforge")
raw = torch.ops.difforge

# name: (grid, P, mode, dims, ssp_rank, ssp_size, dtype, trailing)
CONFIGS = {
    "2d_group_padded_fp32": ((1, 3, 5), 2, "group", 2, 0, 1, torch.float32, (3,)),
    "1d_token_ssp_bf16": ((2, 3, 5), 2, "token", 1, 1, 2, torch.bfloat16, (2, 4)),
    "2d_token_empty_ssp4_fp16": ((2, 1, 6), 2, "token", 2, 3, 4, torch.float16, (5,)),
    "2d_group_p3_fp32": ((1, 4, 10), 3, "group", 2, 1, 3, torch.float32, ()),
}
GRAD_UTILS = ("test_schema", "test_autograd_registration")


def _x(cfg, device, requires_grad=True, B=2):
    grid, *_, dtype, trailing = cfg
    x = random_tensor((B, grid[0] * grid[1] * grid[2], *trailing), dtype, seed=1, device=device)
    return x.requires_grad_(requires_grad and dtype.is_floating_point)


def _xs(cfg, device, requires_grad=True, B=2, full=False):
    grid, P, _, dims, _, S, dtype, trailing = cfg
    rows = groups(P, dims) // (1 if full else S) * B
    xs = random_tensor((rows, seq_len(grid, P, dims), *trailing), dtype, seed=2, device=device)
    return xs.requires_grad_(requires_grad and dtype.is_floating_point)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_opcheck_rearrange(device, name):
    grid, P, mode, dims, rank, S, *_ = CONFIGS[name]
    run_opcheck(raw.skiparse_rearrange.default, (_x(CONFIGS[name], device), list(grid), P, mode, dims, rank, S))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_opcheck_restore(device, name):
    grid, P, mode, dims, rank, S, *_ = CONFIGS[name]
    run_opcheck(raw.skiparse_restore.default, (_xs(CONFIGS[name], device), list(grid), P, mode, dims, rank, S))


@pytest.mark.parametrize("name", ["2d_group_padded_fp32", "1d_token_ssp_bf16", "2d_group_p3_fp32"])
def test_opcheck_switch(device, name):
    grid, P, mode, dims, *_ = CONFIGS[name]
    run_opcheck(raw.skiparse_switch.default, (_xs(CONFIGS[name], device, full=True), list(grid), P, mode, dims))


def test_opcheck_integer_dtype(device):
    """int64 rows (index tensors) through the three permutation ops."""
    grid = [2, 3, 5]
    x = random_tensor((2, 30, 2), torch.int64, seed=3, device=device)
    run_opcheck(raw.skiparse_rearrange.default, (x, grid, 2, "group", 2, 1, 2))
    xs = random_tensor((8, seq_len(grid, 2), 2), torch.int64, seed=4, device=device)
    run_opcheck(raw.skiparse_restore.default, (xs, grid, 2, "token", 2, 0, 1))
    run_opcheck(raw.skiparse_switch.default, (xs, grid, 2, "token", 2))


def _exchange_args(name, device, requires_grad):
    grid, P, mode, dims, rank, S, *_ = CONFIGS[name]
    cfg = CONFIGS[name]
    send_args = (_xs(cfg, device, requires_grad), list(grid), P, mode, dims, rank, S)
    send = raw.skiparse_exchange_send(*[a.detach() if isinstance(a, torch.Tensor) else a for a in send_args])
    recv_args = (send.clone().requires_grad_(requires_grad and send.dtype.is_floating_point), list(grid), P, mode,
                 dims, rank, S)  # fmt: skip
    return send_args, recv_args


@pytest.mark.parametrize("name", ["1d_token_ssp_bf16", "2d_token_empty_ssp4_fp16", "2d_group_p3_fp32"])
def test_opcheck_exchange(device, name):
    send_args, recv_args = _exchange_args(name, device, requires_grad=False)
    run_opcheck(raw.skiparse_exchange_send.default, send_args)
    run_opcheck(raw.skiparse_exchange_receive.default, recv_args)


def test_opcheck_exchange_autograd_registration_inputs_requiring_grad(device):
    """Forbidden backward: with inputs that require grad the autograd registration check must still pass."""
    send_args, recv_args = _exchange_args("2d_group_p3_fp32", device, requires_grad=True)
    assert send_args[0].requires_grad and recv_args[0].requires_grad
    run_opcheck(raw.skiparse_exchange_send.default, send_args, test_utils=GRAD_UTILS)
    run_opcheck(raw.skiparse_exchange_receive.default, recv_args, test_utils=GRAD_UTILS)


# ---- gradcheck ---------------------------------------------------------------------------------------------------

GRADCHECK = [((1, 3, 5), 2, "token", 2, 0, 1), ((1, 3, 5), 2, "group", 2, 1, 2), ((2, 1, 6), 2, "group", 2, 0, 4),
             ((2, 2, 4), 3, "token", 1, 0, 1), ((1, 4, 5), 3, "group", 2, 2, 3)]  # fmt: skip
GRADCHECK_IDS = [f"{g[0]}x{g[1]}x{g[2]}-P{p}-{m}-{d}d-r{r}of{s}" for g, p, m, d, r, s in GRADCHECK]


@pytest.mark.parametrize("grid,P,mode,dims,rank,S", GRADCHECK, ids=GRADCHECK_IDS)
def test_gradcheck_rearrange_restore(grid, P, mode, dims, rank, S):
    args = (list(grid), P, mode, dims, rank, S)
    x = random_tensor((2, grid[0] * grid[1] * grid[2], 2), torch.float64, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: raw.skiparse_rearrange(t, *args), (x,))
    xs = random_tensor((groups(P, dims) // S * 2, seq_len(grid, P, dims), 2), torch.float64, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: raw.skiparse_restore(t, *args), (xs,))


@pytest.mark.parametrize("grid,P,mode,dims", [((1, 3, 5), 2, "token", 2), ((2, 1, 6), 2, "group", 2),
                                              ((1, 2, 7), 3, "group", 1)])  # fmt: skip
def test_gradcheck_switch(grid, P, mode, dims):
    xs = random_tensor((groups(P, dims) * 2, seq_len(grid, P, dims), 2), torch.float64, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: raw.skiparse_switch(t, list(grid), P, mode, dims), (xs,))


def test_gradgradcheck():
    """The backward of each op is another differentiable op of the family, so double backward works."""
    grid = [1, 3, 5]
    x = random_tensor((1, 15, 2), torch.float64, seed=8).requires_grad_()
    xs = random_tensor((4, 8, 2), torch.float64, seed=9).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: raw.skiparse_rearrange(t, grid, 2, "group", 2, 0, 1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: raw.skiparse_restore(t, grid, 2, "token", 2, 1, 2), (xs[2:],))
    assert torch.autograd.gradgradcheck(lambda t: raw.skiparse_switch(t, grid, 2, "token", 2), (xs,))
