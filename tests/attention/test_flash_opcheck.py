"""torch.library.opcheck of flash_attention and flash_attention_backward (schema, autograd registration, fake
kernels, AOT dispatch with dynamic shapes) through tests/opcheck.py::run_opcheck."""

from __future__ import annotations

import pytest
import torch

from attention_testlib import cotangents, make_case, raw_args, raw_backward_args
from opcheck import run_opcheck

difforge = pytest.importorskip("difforge")

CONFIGS = {
    "batch": dict(B=2, Lq=5, Lk=7, Hq=2, D=8),
    "causal_gqa_scale": dict(B=1, Lq=6, Lk=4, Hq=4, Hkv=2, D=16, causal=True, scale=0.5),
    "varlen": dict(seqlens_q=[3, 0, 4], seqlens_k=[2, 5, 4], Hq=2, Hkv=1, D=8, causal=True),
    "varlen_no_max": dict(seqlens_q=[3, 2], seqlens_k=[2, 5], Hq=2, D=8, give_max_seqlen=False),
    "bias_seqused": dict(B=2, Lq=4, Lk=6, Hq=2, D=8, bias_rank=3, seqused_k=[6, 2]),
    "varlen_bias": dict(seqlens_q=[2, 3], seqlens_k=[4, 1], Hq=2, D=8, bias_rank=2),
    "bf16": dict(B=1, Lq=5, Lk=5, Hq=2, D=16, dtype=torch.bfloat16, causal=True),
    "bf16_bias": dict(B=1, Lq=3, Lk=5, Hq=2, D=16, dtype=torch.bfloat16, bias_rank=2),
}
FP64 = dict(B=1, Lq=3, Lk=4, Hq=2, D=4, dtype=torch.float64)


def _case(name, device):
    return make_case(device=device, seed=7, **CONFIGS[name])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_opcheck_forward(device, name):
    case = _case(name, device).leaf_copies()
    run_opcheck(torch.ops.difforge.flash_attention.default, raw_args(case))


def test_opcheck_forward_float64():  # float64 is a CPU-only path
    case = make_case(device="cpu", seed=7, **FP64).leaf_copies()
    run_opcheck(torch.ops.difforge.flash_attention.default, raw_args(case))


BACKWARD = [("batch", True), ("causal_gqa_scale", False), ("varlen", True), ("bias_seqused", True), ("bf16", False),
            ("bf16_bias", True)]  # fmt: skip


@pytest.mark.parametrize("name,with_dlse", BACKWARD, ids=[f"{n}-{'dlse' if d else 'no_dlse'}" for n, d in BACKWARD])
def test_opcheck_backward(device, name, with_dlse):
    case = _case(name, device)
    out, lse = torch.ops.difforge.flash_attention(*raw_args(case))
    dout, dlse = cotangents(case, with_lse=with_dlse)
    run_opcheck(torch.ops.difforge.flash_attention_backward.default, raw_backward_args(case, dout, dlse, out, lse))


def test_opcheck_forward_without_grad(device):
    """Inputs that do not require grad (inference)."""
    case = _case("varlen_bias", device)
    run_opcheck(torch.ops.difforge.flash_attention.default, raw_args(case))
