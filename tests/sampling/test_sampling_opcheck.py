"""torch.library.opcheck of discrete_step, tweedie_step and select_positions (schema, autograd registration, fake
kernels, AOT dispatch with dynamic shapes) through tests/opcheck.py::run_opcheck, the forbidden backward, and
torch.compile(fullgraph=True) through the Python wrappers against the plain-PyTorch references."""

from __future__ import annotations

import pytest
import torch

from opcheck import run_opcheck
from sampling_testlib import ref_discrete_step, ref_select_positions, ref_tweedie_step

difforge = pytest.importorskip("difforge")
ops = difforge.ops
raw = torch.ops.difforge


def _step_inputs(device, dtype=torch.float32, shape=(2, 3), vocab=40, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, vocab, generator=gen).to(dtype).to(device).requires_grad_(requires_grad)
    # opcheck compares outputs without equal_nan: every row is read (w_p > 0) and the point lies in the vocabulary,
    # so no statistic is NaN
    point = torch.randint(0, vocab, shape, generator=gen).to(device)
    coef = torch.rand(*shape, 3, generator=gen).to(device) + 0.01
    return logits, point, coef


STEP_CONFIGS = {
    "mixture_fp32": (torch.float32, ("mixture", 1.0, False, 0, 1.0)),
    "euler_bf16_filtered": (torch.bfloat16, ("euler", 0.7, False, 10, 0.9)),
    "ctmc_fp16_greedy": (torch.float16, ("ctmc", 1.0, True, 0, 1.0)),
    "tau_leap_top_p": (torch.float32, ("tau_leap", 1.3, False, 0, 0.5)),
}


@pytest.mark.parametrize("name", list(STEP_CONFIGS))
def test_opcheck_discrete_step(device, name):
    dtype, (rule, temperature, greedy, top_k, top_p) = STEP_CONFIGS[name]
    logits, point, coef = _step_inputs(device, dtype)
    run_opcheck(raw.discrete_step.default, (logits, point, coef, rule, temperature, greedy, top_k, top_p, 5, 2))


def test_opcheck_tweedie_step(device):
    logits, point, _ = _step_inputs(device, vocab=17)
    e = torch.rand(2, 3, device=device) * 0.9 + 0.05
    run_opcheck(raw.tweedie_step.default, (logits, point.clamp(max=16), e, 3, 1))


@pytest.mark.parametrize("threshold", [False, True])
def test_opcheck_select_positions(device, threshold):
    gen = torch.Generator().manual_seed(1)
    key = torch.randn(3, 50, generator=gen).to(device)
    eligible = (torch.rand(3, 50, generator=gen) < 0.5).to(device)
    k = torch.tensor([0, 4, 60], device=device)
    thr = torch.full((3,), 1.0, device=device) if threshold else None
    run_opcheck(raw.select_positions.default, (key, eligible, k, thr, 0.5, 9, 0))


def test_backward_is_an_error(device):
    """Inputs may require grad (the forward runs); a backward through a sampling op raises instead of returning
    a silent zero gradient."""
    logits, point, coef = _step_inputs(device, requires_grad=True)
    util = ("test_schema", "test_autograd_registration")
    run_opcheck(raw.discrete_step.default, (logits, point, coef, "mixture", 1.0, False, 0, 1.0, 0, 0), test_utils=util)
    _, stats = ops.discrete_step(logits, point, coef, check=False)
    with pytest.raises(RuntimeError, match="discrete_step is not differentiable"):
        stats[..., 1].sum().backward()
    key = torch.randn(2, 5, device=device, requires_grad=True)
    run_opcheck(raw.select_positions.default, (key, key > 0, torch.tensor([1, 2], device=device), None, 1.0, 0, 0),
                test_utils=util)  # fmt: skip


def _pipeline(logits, point, coef, key, eligible):
    """A masked-sampler step: sample tokens, commit the two most confident masked positions per row."""
    token, stats = ops.discrete_step(logits, point, coef, temperature=0.9, top_k=8, seed=3, check=False)
    conf = torch.where(eligible, stats[..., 0], key)
    chosen = ops.select_positions(conf, eligible, 2, threshold=-0.5, seed=3)
    moved = ops.tweedie_step(logits * 0.5, token.clamp(0, logits.shape[-1] - 1), 0.4, seed=4, check=False)
    return torch.where(chosen, token, point), moved, conf


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    logits, point, coef = _step_inputs(device, shape=(3, 7), vocab=33)
    key = torch.randn(3, 7, device=device)
    eligible = torch.rand(3, 7, generator=torch.Generator().manual_seed(5)).to(device) < 0.7
    compiled = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")
    committed, moved, conf = compiled(logits, point, coef, key, eligible)
    token, stats = ref_discrete_step(logits, point, coef, temperature=0.9, top_k=8, seed=3)
    ref_conf = torch.where(eligible.cpu(), stats[..., 0], key.cpu())
    torch.testing.assert_close(conf.cpu(), ref_conf, rtol=1e-5, atol=1e-6)
    chosen = ref_select_positions(conf, eligible, 2, threshold=-0.5, seed=3)
    assert torch.equal(committed.cpu(), torch.where(chosen, token, point.cpu()))
    ref_moved = ref_tweedie_step(logits * 0.5, token.clamp(0, 32), 0.4, seed=4)
    assert torch.equal(moved.cpu(), ref_moved)
