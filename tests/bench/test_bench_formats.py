"""The formats bench family: listed by the CLI, its case grid and byte/FLOP models, its plain-PyTorch codecs (the
``torch`` baselines, which also make every case's inputs) bit-exact with difforge's ops and torchao, every GEMM
implementation computing the same product at tiny shapes, and a ``--quick`` CPU run through the CLI."""

from __future__ import annotations

import functools
import importlib.util
import json
import math

import pytest
import torch

from bench_testlib import run_bench  # puts the checkout's bench package on sys.path first
from difforge_bench.families import MODULES, formats  # noqa: E402
from difforge_bench.impls import FWD  # noqa: E402
from difforge_bench.registry import Shape, Unavailable, all_families  # noqa: E402

SHAPES = {s.name: s for s in formats.SHAPES}
ALL_OPS = formats.CODECS + formats.GEMMS


def test_list_shows_the_formats_family_and_its_shapes():
    assert "formats" in MODULES and all_families()["formats"] is formats.FAMILY
    out = run_bench("formats", "--list", "--device", "cpu").stdout
    assert "formats:" in out
    for shape in SHAPES:
        assert shape in out


def test_shapes_per_device_are_the_issues():
    assert [s.name for s in formats.FAMILY.select_shapes("cuda", False, None)] == ["gemm_8k", "w4a16_m16", "w4a16_m1"]
    assert [s.name for s in formats.FAMILY.select_shapes("cpu", False, None)] == [
        "cpu_1k", "cpu_w4a16_m16", "cpu_w4a16_m1"]  # fmt: skip
    assert [s.name for s in formats.FAMILY.select_shapes("cpu", True, None)] == ["smoke"]
    assert dict(SHAPES["gemm_8k"].dims) == {"M": 8192, "N": 8192, "K": 8192}
    assert {SHAPES[f"w4a16_m{m}"].dims["M"] for m in (1, 16)} | {8192} == {1, 16, 8192}
    assert all(SHAPES[f"w4a16_m{m}"].dims["N"] == SHAPES[f"w4a16_m{m}"].dims["K"] == 8192 for m in (1, 16))


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu_cases", "gpu_cases"])  # builds cases, runs nothing
def test_case_grid_and_models(device):
    big = SHAPES["gemm_8k" if device == "cuda" else "cpu_1k"]
    by_op = {c.op: c for c in formats.cases(device, big)}
    assert set(by_op) == set(ALL_OPS)
    m, n, k = (big.dims[d] for d in "MNK")
    assert by_op["hif8_encode"].bytes_moved == m * k * 3 and by_op["hif8_quantize"].bytes_moved == m * k * 5
    assert by_op["nvfp4_quantize"].bytes_moved == round(m * k * (2 + 1 / 2 + 1 / 16))
    for op in formats.GEMMS:
        assert by_op[op].flops == 2 * m * n * k and by_op[op].bytes_moved is None
    assert by_op["hif8_linear"].config["dtype"] == ("bf16" if device == "cuda" else "fp32")
    assert set(by_op["hif8_linear"].baselines) == {"matmul", "qdq+matmul", "scaled_mm-fp8"}
    assert isinstance(by_op["hif8_linear"].baselines["scaled_mm-fp8"], Unavailable) == (device == "cpu")
    assert set(by_op["nvfp4_linear"].baselines) == {"matmul", "dequant+matmul"}
    torchao = by_op["nvfp4_quantize"].baselines["torchao"]
    assert isinstance(torchao, Unavailable) == (importlib.util.find_spec("torchao") is None)
    for case in by_op.values():
        assert case.mode == FWD and not isinstance(case.ours, Unavailable)

    for name in ("w4a16_m1", "w4a16_m16") if device == "cuda" else ("cpu_w4a16_m1", "cpu_w4a16_m16"):
        (case,) = formats.cases(device, SHAPES[name])
        d = SHAPES[name].dims
        assert case.op == "nvfp4_linear" and case.flops is None and case.config["dtype"] == "bf16"
        assert case.bytes_moved == d["N"] * d["K"] * 9 // 16 + 4 + 2 * d["M"] * (d["K"] + d["N"])


# ---- the plain-PyTorch codecs ----


def test_hif8_value_table_matches_the_spec():
    v = formats.hif8_value
    assert (v(0x00), v(0x6E), v(0x7E), v(0x07), v(0x01)) == (0.0, 32768.0, 2.0**-15, 2.0**-16, 2.0**-22)
    assert (v(0x60), v(0x70), v(0x50), v(0x58), v(0x08), v(0x0F)) == (256.0, 2.0**-8, 0.0625, 0.015625, 1.0, 1.875)
    assert v(0x6F) == math.inf and v(0xEF) == -math.inf and math.isnan(v(0x80)) and v(0x96) == -v(0x16)
    positive = {v(c) for c in range(0x80) if c != 0x6F}
    assert len(positive) == 127 and all(math.isfinite(x) and x >= 0 for x in positive)  # zero + 126, no duplicate


@functools.cache
def _ops():
    try:
        import difforge.ops as ops

        ops.nvfp4_quantize(torch.ones(1, 16))
        return ops
    except Exception:  # not built yet, or built without the formats kernels
        return None


needs_ops = pytest.mark.skipif(_ops() is None, reason="difforge's formats ops are not built")


def _hard_values() -> torch.Tensor:
    """Every rounding boundary, its neighbours, the specials and a log-spaced sweep over HiF8's range."""
    bounds = formats._hif8_tables()[1]
    near = [bounds, torch.nextafter(bounds, torch.zeros(())), torch.nextafter(bounds, torch.full((), math.inf))]
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**-23, 2.0**-24, 5e4, 40960.0])
    sweep = torch.logspace(-26, 17, 4001, base=2)
    body = torch.cat([*near, specials, sweep])
    return torch.cat([body, -body])


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_hif8_codec_is_bit_exact_with_ours(dtype):
    ops = _ops()
    codes = torch.arange(256, dtype=torch.uint8)
    for scale in (torch.tensor(1.0), torch.tensor(3.7)):
        ours = ops.hif8_decode(codes, torch.float32, scale=scale)
        theirs = formats.torch_hif8_decode(codes, scale, torch.float32)
        assert torch.equal(ours.nan_to_num(7.0), theirs.nan_to_num(7.0))
    x = _hard_values().to(dtype)
    one = torch.tensor(1.0)
    assert torch.equal(ops.hif8_encode(x, scale=one), formats.torch_hif8_encode(x, one))
    y = (torch.randn(32, 48, generator=torch.Generator().manual_seed(0)) * 5).to(dtype)
    codes, scale = ops.hif8_quantize(y)
    ref_codes, ref_scale = formats.torch_hif8_quantize(y)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def _nvfp4_input(dtype):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 64)
    return x.to(dtype)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_nvfp4_codec_is_bit_exact_with_ours_and_torchao(dtype):
    ops = _ops()
    x = _nvfp4_input(dtype)
    pts = formats.torch_nvfp4_per_tensor_scale(x)
    assert torch.equal(pts, ops.nvfp4_per_tensor_scale(x))
    scales, packed = formats.torch_nvfp4_quantize(x, pts)
    ours_scales, ours_packed = ops.nvfp4_quantize(x, pts)
    assert torch.equal(scales.view(torch.uint8), ours_scales.view(torch.uint8)) and torch.equal(packed, ours_packed)
    for out in (torch.float32, torch.bfloat16):
        assert torch.equal(formats.torch_nvfp4_dequantize(scales, packed, pts, out),
                           ops.nvfp4_dequantize(scales, packed, pts, out))  # fmt: skip
    if importlib.util.find_spec("torchao") is not None:
        from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize

        ao_scales, ao_packed = nvfp4_quantize(x, 16, pts)
        assert torch.equal(scales.view(torch.uint8), ao_scales.view(torch.uint8)) and torch.equal(packed, ao_packed)


def test_torch_nvfp4_matches_the_spec_worked_example():
    """hif8_nvfp4 §4.1 A: one-level, block amax 6 (scale 1.0): RNE ties to even and -0."""
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, -0.25, -0.75, -1.25, 0.3, -5, 2.9, 0.0, -0.0]])
    scales, packed = formats.torch_nvfp4_quantize(x, torch.tensor(1.0))
    assert scales.view(torch.uint8).tolist() == [[0x38]]
    assert packed.tolist() == [[0x20, 0x42, 0x64, 0x76, 0xA8, 0x1A, 0x5E, 0x80]]


# ---- every implementation computes the same thing ----


@needs_ops
def test_every_implementation_agrees_at_a_tiny_shape():
    shape = Shape("tiny", {"M": 16, "N": 32, "K": 64}, "test")
    for case in formats.cases("cpu", shape):
        inputs = case.make_inputs("cpu")
        results = {"difforge": case.ours(inputs)()}
        for name, impl in case.baselines.items():
            if not isinstance(impl, Unavailable):
                results[name] = impl(inputs)()
        for name, got in results.items():
            if case.op in formats.GEMMS:
                x, w = inputs["x"], inputs["w"]
                if case.op == "hif8_linear" and name != "matmul":  # the product of the QDQ'd operands, in fp32
                    x, w = formats.torch_hif8_decode(*formats.torch_hif8_quantize(x), torch.float32), inputs["w_qdq"]
                ref = x.double() @ w.double().T
                tol = 1e-5 if case.config["dtype"] == "fp32" else 2e-2  # nvfp4: bf16 output and weight rounding
                torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item(),
                                           msg=f"{name} {case.label()}")  # fmt: skip
            else:  # codecs: bit for bit
                assert all(map(_same_bits, _as_tuple(results["difforge"]), _as_tuple(got))), f"{name} {case.op}"


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_quick_cpu_run(tmp_path):
    out = run_bench("formats", "--device", "cpu", "--quick", "--out", str(tmp_path), timeout=240).stdout
    assert "reproduce: difforge-bench formats --device cpu --shapes smoke --quick" in out
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {r["op"] for r in records} == set(ALL_OPS)
    for r in records:
        if r["impl"] in ("torch", "matmul"):
            assert r["status"] == "ok" and r["median_s"] > 0, r
        if r["impl"] == "difforge" and _ops() is not None:
            assert r["status"] == "ok" and r["speedup"] is None, r
            assert (r["GBps"] or 0) > 0 or (r["TFLOPs"] or 0) > 0, r
