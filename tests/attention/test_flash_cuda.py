"""CUDA kernels against the fp64 oracle (accuracy criterion, eager evaluated on the GPU in the same dtype) and
against the CPU kernels. Everything here is marked ``cuda``: skipped without a GPU, selected by ``pytest -m cuda``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from attention_testlib import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    call_op,
    check_backward,
    check_forward,
    cotangents,
    make_case,
    op_grads,
    stable_seed,
)

pytestmark = pytest.mark.cuda
difforge = pytest.importorskip("difforge")

dtype_ids = [DTYPE_IDS[d] for d in FLOAT_DTYPES]

CONFIGS = {
    # name: make_case kwargs (without dtype / D / device)
    "mha": dict(B=2, Lq=130, Lk=130, Hq=4),
    "mha_causal": dict(B=2, Lq=130, Lk=130, Hq=4, causal=True),
    "gqa_causal_q_lt_k": dict(B=2, Lq=77, Lk=200, Hq=8, Hkv=2, causal=True),
    "gqa_causal_q_gt_k": dict(B=1, Lq=200, Lk=77, Hq=6, Hkv=3, causal=True),
    "mqa": dict(B=1, Lq=96, Lk=257, Hq=4, Hkv=1),
    "seqused": dict(B=3, Lq=64, Lk=300, Hq=4, Hkv=2, causal=True, seqused_k=[300, 0, 131]),
    "varlen": dict(seqlens_q=[100, 0, 1, 257, 33], seqlens_k=[64, 7, 0, 300, 129], Hq=4, Hkv=2, causal=True),
    "varlen_seqused": dict(seqlens_q=[17, 80], seqlens_k=[70, 200], seqused_k=[65, 129], Hq=4, Hkv=4),
    "bias": dict(B=2, Lq=90, Lk=150, Hq=4, Hkv=2, bias_rank=8, causal=True),
    "bias_r32_varlen": dict(seqlens_q=[40, 129], seqlens_k=[200, 129], Hq=2, Hkv=1, bias_rank=32),
    "fused_qkv": dict(B=2, Lq=100, Lk=100, Hq=4, layout="fused_qkv", causal=True),
    "head_major_gqa": dict(B=2, Lq=70, Lk=70, Hq=8, Hkv=2, layout="head_major"),
    "long": dict(B=1, Lq=1024, Lk=1024, Hq=2, causal=True),
}


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cuda_matches_reference(config, dtype, D):
    case = make_case(dtype=dtype, D=D, device="cuda", seed=stable_seed("cuda", config, D), **CONFIGS[config])
    check_forward(case)
    check_backward(case)


@pytest.mark.parametrize("D", [8, 40, 72, 96, 160, 256])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("config", ["mha_causal", "gqa_causal_q_lt_k", "varlen", "bias"])
def test_cuda_other_head_dims(config, dtype, D):
    case = make_case(dtype=dtype, D=D, device="cuda", seed=stable_seed("cuda_d", config, D), **CONFIGS[config])
    check_forward(case)
    check_backward(case)


@pytest.mark.parametrize("D", [64, 128, 40])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("config", ["mha_causal", "gqa_causal_q_gt_k", "seqused", "varlen", "bias", "fused_qkv"])
def test_cuda_matches_cpu(config, dtype, D):
    """CUDA and CPU both accumulate in fp32 and round once: outputs within ~an output ulp, lse within fp32 noise."""
    cpu = make_case(dtype=dtype, D=D, device="cpu", seed=stable_seed("cuda_cpu", config, D), **CONFIGS[config])
    gpu = cpu.to("cuda")
    out_c, lse_c = call_op(cpu)
    out_g, lse_g = call_op(gpu)
    eps = torch.finfo(dtype).eps
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2 * eps, atol=2 * eps)
    torch.testing.assert_close(out_g.cpu(), out_c, **tol)
    torch.testing.assert_close(lse_g.cpu(), lse_c, rtol=1e-5, atol=1e-5)  # -inf positions must agree (equal_nan off)

    dout, dlse = cotangents(cpu)
    _, _, g_c = op_grads(cpu, dout, dlse)
    _, _, g_g = op_grads(gpu, dout.cuda(), dlse.cuda())
    for name in g_c:
        a, b = g_g[name].cpu(), g_c[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        mag = 1.0 + b.abs().max().item() if b.numel() else 1.0
        gt = 1e-4 if b.dtype == torch.float32 and dtype == torch.float32 else 4 * eps
        torch.testing.assert_close(a.float(), b.float(), rtol=gt, atol=gt * mag, msg=lambda m, n=name: f"d{n}: {m}")


def test_cuda_empty_rows_and_no_keys():
    case = make_case(B=2, Lq=40, Lk=0, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16, device="cuda")
    out, lse = call_op(case)
    assert (out == 0).all() and torch.isneginf(lse).all()
    case = make_case(B=2, Lq=90, Lk=17, Hq=4, Hkv=2, D=128, dtype=torch.bfloat16, causal=True, device="cuda")
    check_forward(case)
    g, _ = check_backward(case)
    assert (g["q"][:, : 90 - 17] == 0).all()


def test_cuda_seqused_tail_is_never_read():
    case = make_case(B=2, Lq=64, Lk=256, Hq=2, D=128, dtype=torch.bfloat16, seqused_k=[70, 200], device="cuda")
    k, v = case.k.clone(), case.v.clone()
    k[0, 70:] = float("nan")
    v[0, 70:] = float("nan")
    k[1, 200:] = float("nan")
    v[1, 200:] = float("nan")
    out, lse = call_op(case.replace(k=k, v=v))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    check_forward(case)


def test_cuda_backward_dk_dv_deterministic():
    case = make_case(B=2, Lq=300, Lk=300, Hq=8, Hkv=2, D=128, dtype=torch.bfloat16, causal=True, bias_rank=4,
                     device="cuda", seed=3)  # fmt: skip
    dout, dlse = cotangents(case)
    _, _, a = op_grads(case, dout, dlse)
    _, _, b = op_grads(case, dout, dlse)
    for n in ("k", "v", "bias_k"):
        assert torch.equal(a[n], b[n]), f"d{n} is not deterministic"


def test_cuda_max_seqlen_not_given():
    case = make_case(seqlens_q=[30, 130], seqlens_k=[60, 140], Hq=4, D=64, dtype=torch.float16, causal=True,
                     give_max_seqlen=False, device="cuda")  # fmt: skip
    check_forward(case)
    check_backward(case)


def test_cuda_non_default_stream():
    case = make_case(B=2, Lq=128, Lk=128, Hq=4, D=64, dtype=torch.bfloat16, causal=True, device="cuda", seed=4)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    with torch.cuda.stream(stream):
        out, lse = call_op(case)
    stream.synchronize()
    ref_out, ref_lse = call_op(case)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    check_forward(case)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@st.composite
def cuda_cases(draw):
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    Hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    D = draw(st.sampled_from((32, 64, 96, 128, 256)))
    causal, R = draw(st.booleans()), draw(st.sampled_from((0, 1, 8, 32)))
    seed = draw(st.integers(0, 2**31 - 1))
    if draw(st.booleans()):
        n = draw(st.integers(1, 4))
        sq = draw(st.lists(st.integers(0, 300), min_size=n, max_size=n))
        sk = draw(st.lists(st.integers(0, 300), min_size=n, max_size=n))
        note(f"varlen {sq=} {sk=} {Hkv=} {group=} {D=} {causal=} {dtype=} {R=}")
        return make_case(seqlens_q=sq, seqlens_k=sk, Hq=Hkv * group, Hkv=Hkv, D=D, dtype=dtype, causal=causal,
                         bias_rank=R, device="cuda", seed=seed)  # fmt: skip
    B, Lq, Lk = draw(st.integers(1, 3)), draw(st.integers(1, 300)), draw(st.integers(0, 300))
    used = [draw(st.integers(0, Lk)) for _ in range(B)] if draw(st.booleans()) else None
    note(f"batch {B=} {Lq=} {Lk=} {used=} {Hkv=} {group=} {D=} {causal=} {dtype=} {R=}")
    return make_case(B=B, Lq=Lq, Lk=Lk, Hq=Hkv * group, Hkv=Hkv, D=D, dtype=dtype, causal=causal, seqused_k=used,
                     bias_rank=R, device="cuda", seed=seed)  # fmt: skip


@settings(max_examples=40)
@given(case=cuda_cases())
def test_cuda_hypothesis(case):
    check_forward(case)
    check_backward(case)
