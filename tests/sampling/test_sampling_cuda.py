"""CUDA kernels of the sampling family against the CPU kernels (the reference the CUDA path is validated against; both
draw the same Philox words): tokens equal for every rule, dtype, filter and row layout (warp-per-row small V, block-
per-row large V, odd V, more rows than a grid dimension), statistics to fp32 accumulation-order tolerance, Tweedie
and position selection likewise, and a CUDA-graph capture (the ops never sync the host). Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from sampling_testlib import FLOAT_DTYPES, RULES, top_p_ambiguous_rows

difforge = pytest.importorskip("difforge")
ops = difforge.ops

pytestmark = pytest.mark.cuda

FILTERS = {"none": (0, 1.0), "top_k": (40, 1.0), "top_p": (0, 0.8), "both": (100, 0.9)}


def make_case(rows, vocab, rule, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 2).to(dtype)
    point = torch.randint(0, vocab + 1, (rows,), generator=gen)
    coef = torch.rand(rows, 3, generator=gen)
    if rule == "mixture":
        coef[::4, 0] = 0
    else:
        coef[:, 0] = 10 ** (4 * torch.rand(rows, generator=gen) - 3) / (vocab * math.e**2)
    return logits, point, coef


def assert_same_step(logits, point, coef, **kw):
    """Tokens equal, except on rows whose top-p boundary sits within fp32 rounding of a cumulative mass (the two
    kernels sum the masses in different orders); stats to accumulation-order tolerance."""
    cpu = ops.discrete_step(logits, point, coef, check=False, **kw)
    gpu = ops.discrete_step(logits.cuda(), point.cuda(), coef.cuda(), check=False, **kw)
    ambiguous = top_p_ambiguous_rows(logits, kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("temperature", 1.0))
    differ = ((cpu[0] != gpu[0].cpu()) & ~ambiguous).nonzero()
    assert differ.numel() == 0, f"{len(differ)} token(s) differ, first at {differ[0].tolist()} ({kw})"
    torch.testing.assert_close(gpu[1].cpu()[~ambiguous], cpu[1][~ambiguous], rtol=2e-5, atol=2e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("filt", list(FILTERS))
@pytest.mark.parametrize("greedy", [False, True])
def test_discrete_step_matches_cpu(dtype, rule, filt, greedy):
    top_k, top_p = FILTERS[filt]
    logits, point, coef = make_case(300, 1001, rule, seed=len(rule), dtype=dtype)
    assert_same_step(logits, point, coef, rule=rule, greedy=greedy, temperature=0.8, top_k=top_k, top_p=top_p,
                     seed=99, offset=7)  # fmt: skip


@pytest.mark.parametrize("vocab,rows", [(2, 4096), (7, 4096), (64, 2048), (2047, 256), (2049, 256), (50257, 48),
                                        (126464, 8)])  # fmt: skip
@pytest.mark.parametrize("rule", ["mixture", "euler"])
def test_row_layouts_match_cpu(vocab, rows, rule):
    logits, point, coef = make_case(rows, vocab, rule, seed=vocab, dtype=torch.bfloat16)
    assert_same_step(logits, point, coef, rule=rule, seed=5)
    assert_same_step(logits, point, coef, rule=rule, top_k=min(50, vocab - 1), top_p=0.9, seed=6)


def test_many_rows_and_strided_leading_dims():
    logits, point, coef = make_case(70_000, 5, "ctmc", seed=1)
    assert_same_step(logits, point, coef, rule="ctmc", seed=2)
    wide = torch.randn(4, 6, 40)
    point = torch.randint(0, 31, (4, 3))
    coef = torch.rand(4, 3, 3)
    for x in (wide[:, ::2, :30], wide[:, :3, :30].transpose(0, 1).contiguous().transpose(0, 1),
              wide[:1, :1, :30].expand(4, 3, 30)):  # fmt: skip
        assert_same_step(x, point, coef, seed=3)


def test_unread_and_bad_rows_match_cpu():
    logits, point, coef = make_case(64, 300, "mixture", seed=2)
    coef[1::2, 0] = 0
    logits[1::2] = math.nan  # never read
    logits[0, 5] = math.nan  # read: bad
    logits[2] = -math.inf  # read: no finite logit
    coef[4] = torch.tensor([0.5, -1.0, 0.5])  # invalid weights
    assert_same_step(logits, point, coef, seed=4)
    token, _ = ops.discrete_step(logits.cuda(), point.cuda(), coef.cuda(), seed=4, check=False)
    assert (token[[0, 2, 4]] == -1).all().item()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("vocab,rows", [(5, 3000), (300, 200), (50257, 16)])
def test_tweedie_matches_cpu(dtype, vocab, rows):
    gen = torch.Generator().manual_seed(vocab)
    log_score = (torch.randn(rows, vocab, generator=gen) * 1.5).to(dtype)
    current = torch.randint(0, vocab, (rows,), generator=gen)
    e = torch.rand(rows, generator=gen) * 0.99 + 0.01
    e[::7] = 1.0
    current[3] = vocab  # out of range: -1
    cpu = ops.tweedie_step(log_score, current, e, seed=8, check=False)
    gpu = ops.tweedie_step(log_score.cuda(), current.cuda(), e.cuda(), seed=8, check=False)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("length", [1, 37, 1024, 16_384])
@pytest.mark.parametrize("tau", [0.0, 0.7])
def test_select_positions_matches_cpu(length, tau):
    gen = torch.Generator().manual_seed(length)
    B = 6
    key = torch.randint(-3, 4, (B, length), generator=gen).float()  # many ties
    key[:3] = torch.randn(3, length, generator=gen)
    key[0, ::11] = math.nan
    eligible = torch.rand(B, length, generator=gen) < 0.6
    k = torch.tensor([0, 1, length // 3, length, length + 5, -2])
    for threshold in (None, torch.full((B,), 1.0)):
        cpu = ops.select_positions(key, eligible, k, threshold=threshold, gumbel_tau=tau, seed=3)
        gpu = ops.select_positions(key.cuda(), eligible.cuda(), k.cuda(),
                                   threshold=None if threshold is None else threshold.cuda(), gumbel_tau=tau, seed=3)
        assert torch.equal(cpu, gpu.cpu())


def test_cuda_graph_capture():
    """check=False: no host sync inside the ops, so one step captures into a CUDA graph and replays exactly."""
    logits, point, coef = (t.cuda() for t in make_case(512, 4099, "mixture", seed=9, dtype=torch.bfloat16))
    key = torch.randn(8, 64, device="cuda")
    eligible = torch.rand(8, 64, device="cuda") < 0.5
    k = torch.full((8,), 3, device="cuda")

    def step():
        token, stats = ops.discrete_step(logits, point, coef, top_k=20, seed=1, check=False)
        chosen = ops.select_positions(key, eligible, k, gumbel_tau=0.5, seed=1)
        return token, stats, chosen

    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
