"""Bad input raises a clear error naming the argument (DESIGN.md "Ops: rules"; spec §5)."""

from __future__ import annotations

import pytest
import torch

difforge = pytest.importorskip("difforge")
ops = difforge.ops

ERRORS = (RuntimeError, ValueError, TypeError)
B, L, D = 2, 4, 8


def _x(dtype=torch.float32, shape=(B, L, D)):
    return torch.randn(shape).to(dtype)


def _mod(shape=(B, D), dtype=torch.float32):
    return torch.randn(shape).to(dtype)


def raises(match):
    return pytest.raises(ERRORS, match=match)


# ---- dtypes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_non_float_x(dtype):
    x = torch.ones(B, L, D, dtype=dtype)
    with raises(r"\bx\b"):
        ops.adaln_modulate(x, _mod(), _mod())
    with raises(r"\bx\b|\bh\b"):
        ops.gated_adaln_modulate(x, _x(), None, _mod(), _mod())


@pytest.mark.parametrize("name", ["scale", "shift", "weight", "bias"])
def test_non_float_modulation_or_affine(name):
    args = dict(scale=_mod(), shift=_mod(), weight=None, bias=None)
    args[name] = torch.ones((B, D) if name in ("scale", "shift") else (D,), dtype=torch.int64)
    with raises(name):
        ops.adaln_modulate(_x(), args["scale"], args["shift"], weight=args["weight"], bias=args["bias"])


def test_non_float_o_and_gate():
    with raises(r"\bo\b"):
        ops.gated_adaln_modulate(_x(), torch.ones(B, L, D, dtype=torch.int32), None, None, None)
    with raises("gate"):
        ops.gated_adaln_modulate(_x(), _x(), torch.ones(B, D, dtype=torch.int32), None, None)


def test_float64_is_accepted_on_cpu():
    """fp64 is the documented gradcheck path on CPU: every input fp64, statistics fp64."""
    x = _x(torch.float64)
    y, mean, rstd = torch.ops.difforge.adaln_modulate(x, None, None, None, None, "layernorm", 1e-6, 1, None, 0)
    assert y.dtype == torch.float64 and mean.dtype == torch.float64 and rstd.dtype == torch.float64
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (D,), eps=1e-6), rtol=1e-12, atol=1e-12)


def test_float64_o_with_float32_x():
    with raises(r"\bo\b"):
        ops.gated_adaln_modulate(_x(), _x(torch.float64), None, None, None)


# ---- shapes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scale", "shift"])
@pytest.mark.parametrize("shape", [(D + 1,), (B, D - 1), (B, 1, D + 2)])
def test_modulation_feature_size_mismatch(name, shape):
    args = {"scale": None, "shift": None, name: _mod(shape)}
    with raises(name):
        ops.adaln_modulate(_x(), args["scale"], args["shift"])


def test_gate_feature_size_mismatch():
    with raises("gate"):
        ops.gated_adaln_modulate(_x(), _x(), _mod((B, D + 1)), _mod(), _mod())


@pytest.mark.parametrize("mod_batch", [1, 3])
def test_modulation_batch_mismatch(mod_batch):
    with raises("batch"):
        ops.adaln_modulate(_x(), _mod((mod_batch, D)), _mod((mod_batch, D)))


def test_modulation_batch_mismatch_with_batch_repeat():
    x = _x(shape=(3 * B, L, D))
    ops.adaln_modulate(x, _mod(), _mod(), batch_repeat=3)  # fine
    with raises("batch"):
        ops.adaln_modulate(x, _mod(), _mod(), batch_repeat=2)
    with raises("batch"):
        ops.adaln_modulate(x, _mod(), _mod())  # forgot batch_repeat


@pytest.mark.parametrize("bad", [0, -1])
def test_batch_repeat_must_be_positive(bad):
    with raises("batch_repeat"):
        ops.adaln_modulate(_x(), _mod(), _mod(), batch_repeat=bad)


@pytest.mark.parametrize("G", [3, 5, 8])
def test_groups_must_divide_sequence_length(G):
    with raises(r"divide|\bG\b|group"):
        ops.adaln_modulate(_x(), _mod((B, G, D)), _mod((B, G, D)))


def test_mixed_modulation_layouts():
    with raises(r"shift|layout"):
        ops.adaln_modulate(_x(), _mod((B, D)), _mod((B, 2, D)))
    with raises(r"shift|layout"):
        ops.adaln_modulate(_x(), _mod((D,)), _mod((B, D)))
    with raises(r"gate|layout"):
        ops.gated_adaln_modulate(_x(), _x(), _mod((B, L, D)), _mod((B, D)), _mod((B, D)))


@pytest.mark.parametrize("shape", [(B, 2, 2, D), (B, L, D, 1)])
def test_modulation_rank(shape):
    with raises("scale"):
        ops.adaln_modulate(_x(), torch.randn(shape), None)


def test_zero_features():
    x = torch.empty(B, L, 0)
    with raises(r"\bD\b|features|dim"):
        ops.adaln_modulate(x, None, None)
    with raises(r"\bD\b|features|dim"):
        ops.gated_adaln_modulate(x, torch.empty(B, L, 0), None, None, None)


@pytest.mark.parametrize("shape", [(B * L * D,), (B, L, D, 1)])
def test_x_rank_without_cu_seqlens(shape):
    with raises(r"\bx\b"):
        ops.adaln_modulate(torch.randn(shape), None, None)


def test_o_shape_mismatch():
    with raises(r"\bo\b"):
        ops.gated_adaln_modulate(_x(), _x(shape=(B, L + 1, D)), None, None, None)


@pytest.mark.parametrize("name,shape", [("weight", (D + 1,)), ("weight", (1, D)), ("bias", (D - 1,))])
def test_affine_shape(name, shape):
    kw = {name: torch.randn(shape)}
    with raises(name):
        ops.adaln_modulate(_x(), None, None, **kw)


# ---- options ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["LayerNorm", "rms", "batchnorm", ""])
def test_bad_norm_string(norm):
    with raises("norm"):
        ops.adaln_modulate(_x(), None, None, norm=norm)
    with raises("norm"):
        ops.gated_adaln_modulate(_x(), _x(), None, None, None, norm=norm)
    with raises("norm"):
        torch.ops.difforge.adaln_modulate(_x(), None, None, None, None, norm, 1e-6, 1, None, 0)


def test_bias_with_rmsnorm():
    with raises("bias"):
        ops.adaln_modulate(_x(), None, None, weight=torch.ones(D), bias=torch.zeros(D), norm="rmsnorm")
    with raises("bias"):
        ops.gated_adaln_modulate(_x(), _x(), None, None, None, bias=torch.zeros(D), norm="rmsnorm")


def test_negative_eps():
    with raises("eps"):
        ops.adaln_modulate(_x(), None, None, eps=-1e-6)


# ---- cu_seqlens ------------------------------------------------------------------------------------------------


def _packed(N=10):
    return torch.randn(N, D)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.int16])
def test_cu_seqlens_dtype(dtype):
    with raises("cu_seqlens"):
        ops.adaln_modulate(_packed(), _mod(), None, cu_seqlens=torch.tensor([0, 4, 10], dtype=dtype))


@pytest.mark.parametrize(
    "cu,match",
    [
        ([0, 6, 4, 10], "cu_seqlens"),  # not monotone
        ([0, 4, 9], "cu_seqlens"),  # cu[-1] != N
        ([0, 4, 11], "cu_seqlens"),  # cu[-1] > N: would read out of bounds
        ([1, 4, 10], "cu_seqlens"),  # cu[0] != 0
        ([10], "cu_seqlens"),  # no sequence
    ],
)
def test_cu_seqlens_values(cu, match):
    cu_t = torch.tensor(cu, dtype=torch.int32)
    nseq = max(len(cu) - 1, 1)
    with raises(match):
        ops.adaln_modulate(_packed(), _mod((nseq, D)), None, cu_seqlens=cu_t)
    with raises(match):
        ops.gated_adaln_modulate(_packed(), _packed(), None, _mod((nseq, D)), None, cu_seqlens=cu_t)


def test_cu_seqlens_2d():
    with raises("cu_seqlens"):
        ops.adaln_modulate(_packed(), _mod(), None, cu_seqlens=torch.tensor([[0, 4, 10]], dtype=torch.int32))


def test_cu_seqlens_modulation_batch_mismatch():
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with raises(r"batch|sequences|cu_seqlens"):
        ops.adaln_modulate(_packed(), _mod((3, D)), None, cu_seqlens=cu)
    with raises(r"batch|sequences|cu_seqlens|group"):
        ops.adaln_modulate(_packed(), _mod((2, 3, D)), None, cu_seqlens=cu)


def test_cu_seqlens_requires_packed_x():
    with raises(r"\bx\b|packed"):
        ops.adaln_modulate(_x(), _mod(), None, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))


def test_max_seqlen_shorter_than_longest_sequence():
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with raises("max_seqlen"):
        ops.adaln_modulate(_packed(), _mod(), None, cu_seqlens=cu, max_seqlen=5)


# ---- backward op ---------------------------------------------------------------------------------------------


def test_backward_op_rejects_mismatched_dy():
    x = _x()
    y, mean, rstd = torch.ops.difforge.adaln_modulate(x, None, None, None, None, "layernorm", 1e-6, 1, None, 0)
    with raises(r"\bdy\b"):
        torch.ops.difforge.adaln_modulate_backward(
            torch.randn(B, L, D + 1), None, x, None, None, None, None, None, None, mean, rstd, "layernorm", 1, None, 0
        )
    with raises(r"\bdy\b"):
        torch.ops.difforge.adaln_modulate_backward(
            torch.randn(B, L, D, dtype=torch.float16), None, x, None, None, None, None, None, None, mean, rstd,
            "layernorm", 1, None, 0,
        )  # fmt: skip
    with raises(r"\brstd\b"):
        torch.ops.difforge.adaln_modulate_backward(
            torch.randn(B, L, D), None, x, None, None, None, None, None, None, mean, rstd[:-1], "layernorm", 1, None, 0
        )


# ---- devices ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["scale", "shift", "weight", "bias", "o", "gate", "cu_seqlens"])
def test_device_mismatch(name):
    x = _x().cuda()
    args = dict(o=_x().cuda(), gate=_mod().cuda(), scale=_mod().cuda(), shift=_mod().cuda(),
                weight=torch.ones(D, device="cuda"), bias=torch.zeros(D, device="cuda"))  # fmt: skip
    if name == "cu_seqlens":
        packed = torch.randn(10, D, device="cuda")
        with raises("cu_seqlens"):
            ops.adaln_modulate(packed, args["scale"], None, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
        return
    args[name] = args[name].cpu()
    with raises(name):
        ops.gated_adaln_modulate(
            x, args["o"], args["gate"], args["scale"], args["shift"], weight=args["weight"], bias=args["bias"]
        )


@pytest.mark.cuda
def test_cuda_rejects_float64():
    with raises(r"float64|x"):
        ops.adaln_modulate(_x(torch.float64).cuda(), None, None)
