"""Hypothesis over shapes, GQA groups, head dims, causal, dtypes, seqused_k, bias rank and varlen lengths, against
the fp64 oracle with the accuracy criterion (bounded sizes: each example well under 0.2 s on a CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from attention_testlib import Case, check_backward, check_forward, make_case

difforge = pytest.importorskip("difforge")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
HEAD_DIMS = (1, 4, 8, 16, 24, 40, 64, 72, 128)


@st.composite
def cases(draw, device: str = "cpu", varlen: bool = False):
    dtypes = [d for d in DTYPES if device == "cpu" or d != "fp64"]
    dtype = DTYPES[draw(st.sampled_from(dtypes))]
    Hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    D = draw(st.sampled_from(HEAD_DIMS))
    causal = draw(st.booleans())
    R = draw(st.sampled_from((0, 0, 1, 3, 8, 32)))
    scale = draw(st.sampled_from((None, None, 0.3, 1.7)))
    seed = draw(st.integers(0, 2**31 - 1))
    if varlen:
        n = draw(st.integers(1, 4))
        sq = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
        sk = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
        used = None
        if draw(st.booleans()):
            used = [draw(st.integers(0, k)) for k in sk]
        note(f"varlen {sq=} {sk=} {used=} Hkv={Hkv} group={group} {D=} {causal=} {dtype=} {R=} {scale=}")
        return make_case(seqlens_q=sq, seqlens_k=sk, seqused_k=used, Hq=Hkv * group, Hkv=Hkv, D=D, dtype=dtype,
                         causal=causal, bias_rank=R, scale=scale, device=device, seed=seed)  # fmt: skip
    B = draw(st.integers(1, 2))
    Lq = draw(st.integers(1, 70))
    Lk = draw(st.integers(0, 70))
    used = None
    if draw(st.booleans()):
        used = [draw(st.integers(0, Lk)) for _ in range(B)]
    layout = draw(st.sampled_from(("contiguous", "contiguous", "head_major", "padded")))
    note(f"batch {B=} {Lq=} {Lk=} {used=} Hkv={Hkv} group={group} {D=} {causal=} {dtype=} {R=} {scale=} {layout=}")
    return make_case(B=B, Lq=Lq, Lk=Lk, Hq=Hkv * group, Hkv=Hkv, D=D, dtype=dtype, causal=causal, seqused_k=used,
                     bias_rank=R, scale=scale, layout=layout, device=device, seed=seed)  # fmt: skip


@given(case=cases())
def test_hypothesis_forward(case: Case):
    check_forward(case)


@given(case=cases())
def test_hypothesis_backward(case: Case):
    check_backward(case)


@given(case=cases(varlen=True))
def test_hypothesis_varlen_forward_backward(case: Case):
    check_forward(case)
    check_backward(case)
