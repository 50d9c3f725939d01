"""torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch) on the norm ops."""

from __future__ import annotations

import pytest
import torch

from adaln_testlib import make_case, raw_args
from opcheck import run_opcheck

difforge = pytest.importorskip("difforge")

OPCHECK_CASES = [
    # (layout, norm, affine, gate, dtype)
    ("sample", "layernorm", "weight_bias", "off", torch.float32),
    ("chunk", "layernorm", "none", "tensor", torch.float32),
    ("frame", "rmsnorm", "weight", "none", torch.bfloat16),
    ("repeat", "layernorm", "weight", "tensor", torch.float32),
    ("varlen", "rmsnorm", "none", "tensor", torch.float32),
    ("none", "layernorm", "none", "off", torch.float16),
]


def _ids(case):
    layout, norm, affine, gate, dtype = case
    return f"{layout}-{norm}-{affine}-{gate}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("params", OPCHECK_CASES, ids=_ids)
def test_opcheck_forward_ops(params, device):
    layout, norm, affine, gate, dtype = params
    case = make_case(layout, norm=norm, affine=affine, gate=gate, dtype=dtype, L=4, D=16, device=device, seed=1)
    case = case.leaf_copies()
    op = torch.ops.difforge.gated_adaln_modulate if case.gated else torch.ops.difforge.adaln_modulate
    run_opcheck(op.default, raw_args(case))


@pytest.mark.parametrize("params", OPCHECK_CASES, ids=_ids)
def test_opcheck_backward_op(params, device):
    layout, norm, affine, gate, dtype = params
    case = make_case(layout, norm=norm, affine=affine, gate=gate, dtype=dtype, L=4, D=16, device=device, seed=2)
    if case.gated:
        x_out, _, mean, rstd = torch.ops.difforge.gated_adaln_modulate(*raw_args(case))
    else:
        _, mean, rstd = torch.ops.difforge.adaln_modulate(*raw_args(case))
        x_out = case.x
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(case.x.shape, generator=gen).to(device, dtype)
    dx_out = torch.randn(case.x.shape, generator=gen).to(device, dtype) if case.gated else None
    args = (
        dy, dx_out, x_out, case.o, case.gate, case.scale, case.shift, case.weight, case.bias, mean, rstd,
        case.norm, case.batch_repeat, case.cu_seqlens, int(case.max_seqlen or 0),
    )  # fmt: skip
    run_opcheck(torch.ops.difforge.adaln_modulate_backward.default, args)


def test_run_opcheck_reports_failures_readably():
    """The shared helper fails with the utility name and the sample inputs when an op is mis-registered."""

    @torch.library.custom_op("difforge_test::bad_fake", mutates_args=())
    def bad_fake(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @bad_fake.register_fake
    def _(x):
        return x.new_empty(x.shape[0] + 1)  # wrong shape on purpose

    with pytest.raises(AssertionError) as info:
        run_opcheck(bad_fake, (torch.randn(3),), test_utils=("test_schema", "test_faketensor"))
    text = str(info.value)
    assert "test_faketensor" in text and "Tensor(3,) float32 cpu" in text
    assert "test_schema" not in text.split("sample inputs:")[0].replace("opcheck failed", "")
