"""The attention bench family: listed by the CLI, its case grid and FLOP model, and (at tiny shapes) every
implementation it times computing the same attention, so layout slips between [B, L, H, D] and [B, H, L, D]
cannot pass as speedups. Nothing here runs a benchmark-sized kernel."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from bench_testlib import run_bench  # puts the checkout's bench package on sys.path first
from difforge_bench.families import attention, attention_skiparse  # noqa: E402
from difforge_bench.impls import FWD, FWD_BWD  # noqa: E402
from difforge_bench.registry import Shape, Unavailable  # noqa: E402

SHAPES = {s.name: s for s in attention.FAMILY.shapes}
CUDA_ONLY = ("sdpa-efficient", "sdpa-cudnn", "flash-attn", "flash-attn3")


def test_list_shows_the_attention_family_and_its_shapes():
    result = run_bench("attention", "--list", "--device", "cpu")
    assert "attention:" in result.stdout
    for shape in ("L4k", "L32k", "wan13b_480p", "kvcache_chunk", "cpu_L4k", "smoke", "smoke_kv"):
        assert shape in result.stdout


def test_cpu_cases_cover_modes_masks_and_dtypes_with_the_flop_model():
    shape = SHAPES["cpu_L4k"]
    assert shape in attention.FAMILY.select_shapes("cpu", quick=False, names=None)
    cases = attention.cases("cpu", shape)
    grid = {(c.mode, c.config["mask"], c.config["dtype"]) for c in cases}
    assert grid == {(m, k, d) for m in (FWD, FWD_BWD) for k in ("noncausal", "causal") for d in ("fp32", "bf16")}
    fwd = 4 * 1 * 4 * 4096 * 4096 * 128
    for c in cases:
        expected = fwd // 2 if c.config["mask"] == "causal" else fwd
        assert c.flops == (expected if c.mode == FWD else expected * 7 // 2)
        assert c.bytes_moved is None
        assert not isinstance(c.ours, Unavailable)
        for name in CUDA_ONLY:
            assert isinstance(c.baselines[name], Unavailable), name
        for name in ("sdpa-flash", "sdpa-math", "eager"):
            assert not isinstance(c.baselines[name], Unavailable), name


def test_quick_set_is_small_and_lq_ne_lk_runs_without_a_mask():
    quick = attention.FAMILY.select_shapes("cpu", quick=True, names=None)
    assert {s.name for s in quick} == {"smoke", "smoke_kv", "skiparse_smoke"}
    for shape in quick:
        if shape.name in attention_skiparse.SHAPE_NAMES:
            continue
        lq, lk = attention.seqlens(shape)
        assert shape.dims["B"] * shape.dims["H"] * lq * lk * shape.dims["D"] <= 1 << 25
    assert {c.config["mask"] for c in attention.cases("cpu", SHAPES["smoke_kv"])} == {"noncausal"}
    assert {c.config["mask"] for c in attention.cases("cuda", SHAPES["kvcache_chunk"])} == {"noncausal"}


def test_cuda_cases_are_bf16_and_gate_the_materializing_baselines_by_memory():
    for name in ("L4k", "L8k", "L16k", "L32k"):
        shape = SHAPES[name]
        assert shape.dims["B"] * shape.dims["H"] * shape.dims["L"] ** 2 == 1 << 31
    for c in attention.cases("cuda", SHAPES["L32k"]):
        assert c.config["dtype"] == "bf16"
        assert not isinstance(c.baselines["eager"], Unavailable)
    for c in attention.cases("cuda", SHAPES["wan13b_480p"]):  # 12 x 32,760^2 scores: never materialized
        assert isinstance(c.baselines["eager"], Unavailable) and "GiB" in c.baselines["eager"].reason
        assert isinstance(c.baselines["sdpa-math"], Unavailable)
        assert not isinstance(c.baselines["sdpa-flash"], Unavailable)


@functools.cache
def _ours_available() -> bool:
    try:
        from difforge.ops import flash_attention

        q = torch.zeros(1, 1, 1, 8)
        flash_attention(q, q, q)
        return True
    except Exception:  # not built yet, or built without the attention kernels
        return False


def _blhd(impl_name: str, t: torch.Tensor) -> torch.Tensor:
    """SDPA and eager run on [B, H, L, D] copies; bring their outputs and gradients back to [B, L, H, D]."""
    return t.transpose(1, 2) if impl_name.startswith("sdpa") or impl_name == "eager" else t


@pytest.mark.parametrize("mode", [FWD, FWD_BWD])
@pytest.mark.parametrize(
    "dims", [{"B": 2, "H": 2, "L": 48, "D": 16}, {"B": 1, "H": 3, "Lq": 16, "Lk": 40, "D": 16}], ids=["L", "LqLk"]
)
def test_every_implementation_computes_the_same_attention(dims, mode):
    shape = Shape("tiny", dims, "test")
    impls_checked = set()
    for case in attention.cases("cpu", shape):
        if case.mode != mode or case.config["dtype"] != "fp32":
            continue
        inputs = case.make_inputs("cpu")
        implementations = dict(case.baselines)
        if _ours_available():
            implementations["difforge"] = case.ours
        results = {}
        for name, impl in implementations.items():
            if isinstance(impl, Unavailable):
                continue
            out = impl(inputs)()
            out = out if isinstance(out, tuple) else (out,)
            results[name] = [_blhd(name, t) for t in out]
        reference = results.pop("eager")
        assert len(reference) == (1 if mode == FWD else 3)
        for name, tensors in results.items():
            for got, want in zip(tensors, reference, strict=True):
                torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=f"{name} {case.label()}")
        impls_checked |= set(results)
    assert {"sdpa-flash", "sdpa-math"} <= impls_checked
    assert ("difforge" in impls_checked) == _ours_available()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="VmHWM reset needs Linux /proc")
def test_peak_memory_reports_every_implementation():
    case = next(c for c in attention.cases("cpu", SHAPES["smoke_kv"]) if c.config["dtype"] == "fp32")
    found = attention.peak_memory("cpu", case)
    assert set(found) == {"difforge", *case.baselines}
    for name in CUDA_ONLY:
        assert found[name] == "CUDA only"
    for name in ("sdpa-flash", "sdpa-math", "eager"):
        peak, returned = found[name]
        assert peak >= 0 and returned == 64 * 2 * 128 * 4  # out: B=1, Lq=64, H=2, D=128, fp32


# ---- Skiparse cases ----


def _skiparse_case(shape: Shape, op: str, mode: str, skiparse_mode: str = "token"):
    return next(
        c for c in attention_skiparse.skiparse_cases("cpu", shape)
        if c.op == op and c.mode == mode and c.config["mode"] == skiparse_mode
    )  # fmt: skip


def test_skiparse_flop_model_counts_the_padded_sparse_work():
    shape = SHAPES["skiparse_cpu"]  # 4 x 18 x 32 -> 4 x 20 x 32 padded, P = 2
    case = _skiparse_case(shape, "skiparse_attention", FWD)
    assert case.flops == 4 * 1 * 4 * (4 * 20 * 32) ** 2 // 4 * 64
    rearrange = _skiparse_case(shape, "skiparse_rearrange", FWD)
    assert rearrange.bytes_moved == 2 * 4 * 20 * 32 * 4 * 64 * 4


@pytest.mark.skipif(not _ours_available(), reason="needs the built extension")
@pytest.mark.parametrize("mode", [FWD, FWD_BWD])
@pytest.mark.parametrize("skiparse_mode", ["token", "group"])
def test_skiparse_implementations_compute_the_same_attention(mode, skiparse_mode):
    """The einops recipe (padding + key mask) and ours agree; the dense baselines compute dense attention."""
    shape = Shape("tiny", {"B": 2, "T": 2, "Hg": 5, "Wg": 6, "H": 2, "D": 16, "P": 2}, "test")
    case = _skiparse_case(shape, "skiparse_attention", mode, skiparse_mode)
    inputs = case.make_inputs("cpu")
    ours = case.ours(inputs)()
    einops = case.baselines["einops-sdpa"](inputs)()
    for got, want in zip(ours if mode == FWD_BWD else (ours,), einops if mode == FWD_BWD else (einops,)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    dense = case.baselines["dense-ours"](inputs)()
    dense_sdpa = case.baselines["dense-sdpa"](inputs)()
    if mode == FWD:
        torch.testing.assert_close(dense_sdpa.transpose(1, 2), dense, atol=2e-5, rtol=2e-5)
        assert not torch.allclose(dense, ours, atol=1e-3)  # sparse is not dense: the comparison is not vacuous
