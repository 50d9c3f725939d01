"""The kvcache bench family: listed by the CLI, its case grid, FLOP model and cache-bytes field, and (at tiny
shapes) every implementation it times computing the same attention, checked against each other and against a
float64 reference written here (own unpacking of the codes, Jensen taylor2 bias on the cached keys only).
Nothing here runs a benchmark-sized kernel."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from bench_testlib import run_bench  # puts the checkout's bench package on sys.path first
from difforge_bench.families import MODULES, kvcache  # noqa: E402
from difforge_bench.impls import FWD  # noqa: E402
from difforge_bench.registry import Shape, Unavailable, all_families  # noqa: E402

SHAPES = {s.name: s for s in kvcache.SHAPES}
BASELINES = {"flash-bf16", "sdpa", "unfused"}


def test_list_shows_the_kvcache_family_and_its_shapes():
    assert "kvcache" in MODULES and all_families()["kvcache"] is kvcache.FAMILY
    result = run_bench("kvcache", "--list", "--device", "cpu")
    assert "kvcache:" in result.stdout
    for shape in ("selfforcing_chunk", "cpu_L8k", "smoke"):
        assert shape in result.stdout
    assert "int2-g32, int4-g32 x taylor2, none" in result.stdout


def test_shapes_per_device():
    assert [s.name for s in kvcache.FAMILY.select_shapes("cuda", False, None)] == ["selfforcing_chunk"]
    assert [s.name for s in kvcache.FAMILY.select_shapes("cpu", False, None)] == ["cpu_L8k"]
    assert [s.name for s in kvcache.FAMILY.select_shapes("cpu", True, None)] == ["smoke"]
    sf = SHAPES["selfforcing_chunk"].dims
    assert (sf["B"], sf["H"], sf["D"]) == (1, 12, 128)
    assert sf["Lq"] == 3 * 1560 and sf["Lc"] == 21 * 1560  # 3-frame chunk over a 21-frame cache


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu_cases", "gpu_cases"])  # builds cases, runs nothing
def test_case_grid_flop_model_and_cache_bytes(device):
    shape = SHAPES["selfforcing_chunk" if device == "cuda" else "cpu_L8k"]
    cases = kvcache.cases(device, shape)
    grid = {(c.config["cache"], c.config["jensen"]) for c in cases}
    assert grid == {(f"int{b}-g32", j) for b in (2, 4) for j in ("taylor2", "none")}
    d = shape.dims
    flops = 4 * d["B"] * d["H"] * d["Lq"] * (d["Lc"] + d["Lq"]) * d["D"]
    for c in cases:
        assert c.op == "quantized_kv_attention" and c.mode == FWD and c.config["dtype"] == "bf16"
        assert c.flops == flops and c.bytes_moved is None
        assert set(c.baselines) == BASELINES
        assert not isinstance(c.ours, Unavailable)
        assert not any(isinstance(b, Unavailable) for b in c.baselines.values())
        # INT2 g32 fp16 meta: (2 + 32/32) / 16 = 0.1875 of bf16; INT4: 5/16
        assert c.config["cache_vs_bf16"] == {"int2-g32": "0.1875", "int4-g32": "0.3125"}[c.config["cache"]]
    if device == "cuda":
        assert flops == 4 * 12 * 4680 * (32_760 + 4680) * 128
        tokens = 32_760 * 12
        assert kvcache.cache_bytes(shape, 2) == (2 * tokens * (128 * 2 // 8 + 2 * 4 * 2), 2 * tokens * 128 * 2)
        assert any("INT2 36.0 MiB" in note and "bf16 192.0 MiB" in note for note in kvcache.FAMILY.notes)


# ---- every implementation computes the same attention ----


@functools.cache
def _ours_available() -> bool:
    try:
        from difforge.ops import kv_quantize

        kv_quantize(torch.zeros(1, 1, 1, 32))
        return True
    except Exception:  # not built yet, or built without the kvcache kernels
        return False


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., D*bits/8] -> int64 [..., D]: channel c at bits [bits*c % 8, +bits) of byte bits*c // 8."""
    channels = torch.arange(codes.shape[-1] * 8 // bits)
    return (codes.long()[..., bits * channels // 8] >> (bits * channels % 8)) & ((1 << bits) - 1)


def _reference(inputs, bits: int, jensen: str, g: int = 32) -> torch.Tensor:
    """float64 attention of q over [dequantized cache ; current], taylor2 bias on the cached keys only."""
    expand = lambda t: t.double().repeat_interleave(g, -1)  # noqa: E731
    k_hat = expand(inputs["k_zero"]) + expand(inputs["k_step"]) * _unpack(inputs["k_codes"], bits).double()
    v_hat = expand(inputs["v_zero"]) + expand(inputs["v_step"]) * _unpack(inputs["v_codes"], bits).double()
    q = inputs["q"].double()
    scale = 1 / math.sqrt(q.shape[-1])
    cached = scale * torch.einsum("blhc,bkhc->bhlk", q, k_hat)
    if jensen == "taylor2":
        cached = cached - torch.einsum("blhc,bkhc->bhlk", (scale * q / 2) ** 2 / 6, expand(inputs["k_step"]) ** 2)
    current = scale * torch.einsum("blhc,bkhc->bhlk", q, inputs["k_cur"].double())
    p = torch.cat([cached, current], -1).softmax(-1)
    return torch.einsum("bhlk,bkhc->blhc", p, torch.cat([v_hat, inputs["v_cur"].double()], 1))


def _plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(D)) v on [B, L, H, D] tensors."""
    p = torch.einsum("blhc,bkhc->bhlk", q.double(), k.double()).div(math.sqrt(q.shape[-1])).softmax(-1)
    return torch.einsum("bhlk,bkhc->blhc", p, v.double())


def _blhd(name: str, out: torch.Tensor) -> torch.Tensor:
    return out.transpose(1, 2) if name == "sdpa" else out  # sdpa runs on [B, H, L, D] copies


@pytest.mark.skipif(not _ours_available(), reason="difforge's kvcache ops are not built")
@pytest.mark.parametrize(
    "dims", [{"B": 2, "H": 2, "Lq": 16, "Lc": 64, "D": 64}, {"B": 1, "H": 3, "Lq": 24, "Lc": 40, "D": 128}]
)
def test_every_implementation_computes_the_same_attention(dims):
    shape = Shape("tiny", dims, "test")
    for case in kvcache.cases("cpu", shape):
        bits, jensen = int(case.config["cache"][3]), case.config["jensen"]
        inputs = dict(case.make_inputs("cpu"))
        # larger queries than the bench's unit normals, so that the bias stands well above the tolerance
        inputs["q"] = (inputs["q"].float() * (4 if bits == 2 else 8)).bfloat16()
        want = _reference(inputs, bits, jensen)
        if jensen == "taylor2":  # 5x the tolerance: a kernel without the bias fails
            assert (want - _reference(inputs, bits, "none")).abs().max() > 0.1
        # The bf16 baselines see the dequantized cache rounded to bf16, then the current chunk; their reference
        # is plain attention over exactly those values (ours dequantizes in fp32, without that rounding).
        expand = lambda t: t.double().repeat_interleave(32, -1)  # noqa: E731
        for name in ("k", "v"):
            seen = inputs[f"{name}_all"]
            own = expand(inputs[f"{name}_zero"]) + expand(inputs[f"{name}_step"]) * _unpack(
                inputs[f"{name}_codes"], bits).double()  # fmt: skip
            assert torch.equal(seen[:, : dims["Lc"]], own.bfloat16()) and torch.equal(
                seen[:, dims["Lc"] :], inputs[f"{name}_cur"])  # fmt: skip
        baseline_want = _plain(inputs["q"], inputs["k_all"], inputs["v_all"])

        results = {"difforge": case.ours(inputs)()}
        for name, impl in case.baselines.items():
            results[name] = _blhd(name, impl(inputs)())
        for name, out in results.items():
            assert out.shape == inputs["q"].shape and out.dtype == torch.bfloat16, name
            target = want if name == "difforge" else baseline_want
            torch.testing.assert_close(out.double(), target, atol=2e-2, rtol=2e-2, msg=f"{name} {case.label()}")
        for name in BASELINES - {"sdpa"}:  # and with each other (two bf16 roundings apart: twice the tolerance)
            torch.testing.assert_close(results[name], results["sdpa"], atol=4e-2, rtol=4e-2, msg=name)

