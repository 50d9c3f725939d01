"""The pure-Python helpers of difforge.ops.kvcache: hadamard_rotate (QuaRot, spec §2.3) against a Hadamard matrix
built in the test from its closed form H[i, j] = (-1)^popcount(i & j) / sqrt(d), and effective_bits (spec §2.4)."""

from __future__ import annotations

import math

import pytest
import torch

from kvcache_testlib import ref_dequantize, ref_quantize

difforge = pytest.importorskip("difforge")
ops = difforge.ops


def hadamard_ref(d: int) -> torch.Tensor:
    i = torch.arange(d).view(-1, 1)
    j = torch.arange(d).view(1, -1)
    bits = i & j
    parity = torch.zeros_like(bits)
    while bool((bits > 0).any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).double() / math.sqrt(d)


@pytest.mark.parametrize("d", [1, 2, 8, 64, 128])
def test_hadamard_matches_closed_form(device, d):
    x = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(d)).to(device)
    got = ops.hadamard_rotate(x)
    assert got.dtype == x.dtype and got.shape == x.shape and got.device == x.device
    torch.testing.assert_close(got.cpu().double(), x.cpu().double() @ hadamard_ref(d), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_orthogonal_involution(device, dtype):
    """R R = I, |x R| = |x|, and (q R).(k R) = q.k."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 128, generator=gen).to(device)
    rx = ops.hadamard_rotate(x)
    torch.testing.assert_close(ops.hadamard_rotate(rx), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rx.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)
    q, k = torch.randn(6, 128, generator=gen).to(device), torch.randn(6, 128, generator=gen).to(device)
    torch.testing.assert_close((ops.hadamard_rotate(q) * ops.hadamard_rotate(k)).sum(-1), (q * k).sum(-1),
                               atol=1e-4, rtol=1e-5)  # fmt: skip
    xb = x.to(dtype)
    assert ops.hadamard_rotate(xb).dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ops.hadamard_rotate(ops.hadamard_rotate(xb)).float(), xb.float(), atol=tol, rtol=tol)


def test_hadamard_spreads_outlier(device):
    """A single-outlier vector becomes flat: every |entry| = outlier / sqrt(d)."""
    d = 64
    x = torch.zeros(d, device=device)
    x[17] = 100.0
    r = ops.hadamard_rotate(x).cpu()
    torch.testing.assert_close(r.abs(), torch.full((d,), 100.0 / math.sqrt(d)), atol=1e-4, rtol=1e-6)


def test_hadamard_rejects_non_power_of_two(device):
    with pytest.raises(ValueError, match="power of two"):
        ops.hadamard_rotate(torch.randn(2, 48, device=device))


def test_rotation_reduces_quantization_error_with_outlier_channel():
    """QuaRot's point (spec §2.3): with one outlier channel per key, INT4 g = 32 quantization of the rotated keys
    (error measured back in the original basis) beats quantizing the keys as they are."""
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(1, 64, 2, 64, generator=gen)
    k[..., 5] *= 40.0
    codes, step, zero = ops.kv_quantize(k, bits=4, group_size=32, meta_dtype=torch.float32)
    err_plain = (ops.kv_dequantize(codes, step, zero, bits=4, group_size=32, dtype=torch.float32) - k).pow(2).mean()
    kr = ops.hadamard_rotate(k)
    rc, rs, rz = ref_quantize(kr, 4, 32, "token", torch.float32)
    back = ref_dequantize(rc, rs, rz, 4, 32).float() @ hadamard_ref(64).float()
    err_rot = (back - k).pow(2).mean()
    assert err_rot < 0.5 * err_plain, (err_rot.item(), err_plain.item())


@pytest.mark.parametrize(
    "bits,g,meta,expected",
    [(2, 32, torch.float16, 3.0), (4, 32, torch.float16, 5.0), (2, 32, torch.bfloat16, 3.0),
     (2, 64, torch.float16, 2.5), (2, 32, torch.float32, 4.0), (8, 128, torch.float16, 8.25)],
)  # fmt: skip
def test_effective_bits(bits, g, meta, expected):
    assert ops.effective_bits(bits, g, meta) == pytest.approx(expected)
