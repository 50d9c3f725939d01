"""Test library of the fused adaLN norm family (spec/adaln_norm_and_load_balance.md §1-§5).

Three parts:

1. The oracle: a plain-PyTorch composition of the spec's math. It never calls difforge. Modulation rows
   are gathered with explicit index tensors built from the index map of spec §1.3 (global, per-sample,
   per-frame/per-token, batch-repeat, packed varlen) -- a mechanism independent of the strides the kernels
   use. LayerNorm is mean / biased variance, RMSNorm the mean of squares, computed in float64 by default.
2. An "eager" composition in the inputs' own low-precision dtype (torch.nn.functional norms followed by
   elementwise modulation), the yardstick for bf16/fp16 error bounds (FlashAttention-style: the fused op
   may be at most ~2x as far from the oracle as eager is).
3. Case builders (``make_case``) and thin callers of the op under test (``call_op``, ``call_raw``).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

NORMS = ("layernorm", "rmsnorm")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Layout names used across the suite. Each builds x and the modulation tensors as described in make_case.
LAYOUTS = (
    "none",  # scale = shift = None
    "scale_only",  # [B, D] scale, shift None
    "shift_only",  # [B, D] shift, scale None
    "global",  # [D]
    "sample",  # [B, D]
    "sample3",  # [B, 1, D]
    "chunk",  # [B, 1, D] views of e.chunk(6, dim=1), e [B, 6, D] (batch stride 6D)
    "frame",  # [B, F, D], 1 < F < L when possible
    "token",  # [B, L, D]
    "repeat",  # x [R*B, L, D], modulation [B, D], batch_repeat R
    "repeat_frame",  # x [R*B, L, D], modulation [B, F, D], batch_repeat R
    "varlen",  # x [N, D] packed, modulation [S, D], cu_seqlens; S = max(B, 3) sequences, the second empty
    "varlen_global",  # x [N, D] packed, modulation [D], cu_seqlens
)
VARLEN_LAYOUTS = ("varlen", "varlen_global")

# gate modes: "off" = the plain op; "tensor" = gated op with a gate tensor; "none" = gated op with gate=None (g = 1).
GATE_MODES = ("off", "tensor", "none")


def stable_seed(*parts) -> int:
    """A seed derived from test parameters, identical in every process (unlike hash())."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def affine_modes(norm: str) -> tuple[str, ...]:
    return ("none", "weight", "weight_bias") if norm == "layernorm" else ("none", "weight")


# ---------------------------------------------------------------------------------------------------------
# 1. Oracle (no difforge)
# ---------------------------------------------------------------------------------------------------------


def sequence_of_rows(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Packed varlen: index b of the sequence owning each row (cu[b] <= r < cu[b+1]), by a Python loop."""
    cu = [int(v) for v in cu_seqlens.cpu().tolist()]
    owner = []
    for b in range(len(cu) - 1):
        owner += [b] * (cu[b + 1] - cu[b])
    return torch.tensor(owner, dtype=torch.long, device=cu_seqlens.device)


def expand_mod(
    mod: torch.Tensor | None,
    x_shape: Sequence[int],
    *,
    batch_repeat: int = 1,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The modulation row of every row of x, gathered to x's shape (spec §1.3), differentiably.

    [D] global; [B, D] / [B, 1, D] per-sample; [B, G, D]: row l of sample b reads (b % B, l // (L // G));
    x batch row rb reads modulation batch rb % B (batch_repeat); varlen: row r reads its sequence's row.
    """
    if mod is None:
        return None
    D = mod.shape[-1]
    dev = mod.device
    if cu_seqlens is not None:
        (N, _) = x_shape
        if mod.dim() == 1:
            return mod.unsqueeze(0).expand(N, D)
        assert mod.dim() == 2
        return mod[sequence_of_rows(cu_seqlens).to(dev)]
    RB, L, _ = x_shape
    if mod.dim() == 1:
        return mod.view(1, 1, D).expand(RB, L, D)
    B = mod.shape[0]
    assert RB == B * batch_repeat, (RB, B, batch_repeat)
    b_idx = torch.arange(RB, device=dev) % B
    if mod.dim() == 2:
        return mod[b_idx].unsqueeze(1).expand(RB, L, D)
    G = mod.shape[1]
    assert L % G == 0 if G > 0 else L == 0
    group_len = L // G if G > 0 else 1
    g_idx = torch.arange(L, device=dev) // max(group_len, 1)
    return mod[b_idx[:, None], g_idx[None, :]]


@dataclasses.dataclass
class RefOut:
    y: torch.Tensor
    x_out: torch.Tensor | None  # gated only: the residual stream, rounded to h's dtype (kept in the compute dtype)
    mean: torch.Tensor | None  # [rows] layernorm only
    rstd: torch.Tensor  # [rows]
    xh: torch.Tensor  # normalized rows


def ref_norm(x: torch.Tensor, norm: str, eps: float):
    """LayerNorm: mean / biased variance / 1/sqrt(var + eps). RMSNorm: 1/sqrt(mean(x^2) + eps)."""
    if norm == "layernorm":
        mu = x.mean(dim=-1, keepdim=True)
        var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
        rstd = 1.0 / torch.sqrt(var + eps)
        return (x - mu) * rstd, mu.squeeze(-1), rstd.squeeze(-1)
    if norm == "rmsnorm":
        ms = (x * x).mean(dim=-1, keepdim=True)
        rstd = 1.0 / torch.sqrt(ms + eps)
        return x * rstd, None, rstd.squeeze(-1)
    raise ValueError(norm)


def modulate(c: "Case", n: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``n * (1 + scale) + shift`` with the case's modulation expanded to rows, in ``dtype``."""
    s = expand_mod(c.scale, c.x.shape, batch_repeat=c.batch_repeat, cu_seqlens=c.cu_seqlens)
    t = expand_mod(c.shift, c.x.shape, batch_repeat=c.batch_repeat, cu_seqlens=c.cu_seqlens)
    if s is not None:
        n = n * (1 + s.to(dtype))
    if t is not None:
        n = n + t.to(dtype)
    return n


def reference(case: "Case", compute: torch.dtype = torch.float64, *, round_x_out: bool = True) -> RefOut:
    """The spec's forward in ``compute`` precision (differentiable w.r.t. every tensor in ``case``).

    Gated: x_out = h + g * o, rounded once to h's dtype when ``round_x_out`` (y normalizes the residual stream
    as stored, spec §1.2 / "y = adaln_modulate(x_out)"); the rounding is an identity for autograd.
    """
    c = case
    h = c.x.to(compute)
    x_out = None
    if c.gated:
        o = c.o.to(compute)
        g = expand_mod(c.gate, c.x.shape, batch_repeat=c.batch_repeat, cu_seqlens=c.cu_seqlens)
        x = h + (o if g is None else g.to(compute) * o)
        if round_x_out and c.x.dtype != compute:
            x = x + (x.detach().to(c.x.dtype).to(compute) - x.detach())  # round, straight-through gradient
        x_out = x
    else:
        x = h
    xh, mean, rstd = ref_norm(x, c.norm, c.eps)
    n = xh
    if c.weight is not None:
        n = n * c.weight.to(compute)
    if c.bias is not None:
        n = n + c.bias.to(compute)
    y = modulate(c, n, compute)
    rows = c.x.numel() // c.x.shape[-1] if c.x.shape[-1] else 0
    return RefOut(
        y=y,
        x_out=x_out,
        mean=None if mean is None else mean.reshape(rows),
        rstd=rstd.reshape(rows),
        xh=xh,
    )


# ---------------------------------------------------------------------------------------------------------
# 2. Eager composition in the inputs' dtype (error yardstick for bf16 / fp16)
# ---------------------------------------------------------------------------------------------------------


def eager(case: "Case"):
    """What a user writes without difforge, everything in x's dtype: returns (x_out or None, y)."""
    c = case
    dt = c.x.dtype
    D = c.x.shape[-1]
    x_out = None
    x = c.x
    if c.gated:
        g = expand_mod(c.gate, c.x.shape, batch_repeat=c.batch_repeat, cu_seqlens=c.cu_seqlens)
        o = c.o.to(dt)
        x = x + (o if g is None else g.to(dt) * o)
        x_out = x
    w = None if c.weight is None else c.weight.to(dt)
    if c.norm == "layernorm":
        b = None if c.bias is None else c.bias.to(dt)
        n = F.layer_norm(x, (D,), w, b, c.eps)
    else:
        n = F.rms_norm(x, (D,), w, c.eps)
    y = modulate(c, n, dt)
    return x_out, y


# ---------------------------------------------------------------------------------------------------------
# 3. Cases and callers
# ---------------------------------------------------------------------------------------------------------

def clone_strided(t: torch.Tensor, *, dtype=None, device=None) -> torch.Tensor:
    """A detached copy with the same sizes and strides (a chunk view stays a strided view of a bigger buffer)."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):  # overlapping (expanded): plain copy
        return t.detach().to(dtype=dtype or t.dtype, device=device or t.device).contiguous().clone()
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=device or t.device)
    with torch.no_grad():
        out.copy_(t.detach())
    return out


DIFF_NAMES = ("x", "o", "gate", "scale", "shift", "weight", "bias")


@dataclasses.dataclass
class Case:
    x: torch.Tensor  # h of the gated op
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    o: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    gated: bool = False
    norm: str = "layernorm"
    eps: float = 1e-6
    batch_repeat: int = 1
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    label: str = ""

    def inputs(self) -> dict[str, torch.Tensor]:
        """The differentiable tensors present, by name."""
        return {k: getattr(self, k) for k in DIFF_NAMES if getattr(self, k) is not None}

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)

    def map_inputs(self, fn) -> "Case":
        """A copy with fn applied to every differentiable tensor (e.g. fp64 leaf copies for autograd)."""
        return self.replace(**{k: fn(v) for k, v in self.inputs().items()})

    def leaf_copies(self, dtype: torch.dtype | None = None) -> "Case":
        """Leaf copies requiring grad, with the original strides (non-contiguous views stay non-contiguous)."""
        return self.map_inputs(lambda t: clone_strided(t, dtype=dtype).requires_grad_(True))

    def to(self, device) -> "Case":
        c = self.map_inputs(lambda t: clone_strided(t, device=device))
        if self.cu_seqlens is not None:
            c = c.replace(cu_seqlens=self.cu_seqlens.to(device))
        return c

    def kwargs(self) -> dict:
        return dict(
            weight=self.weight,
            bias=self.bias,
            norm=self.norm,
            eps=self.eps,
            batch_repeat=self.batch_repeat,
            cu_seqlens=self.cu_seqlens,
            max_seqlen=self.max_seqlen,
        )

    def __repr__(self) -> str:  # short, for failure messages
        def d(t):
            if t is None:
                return "None"
            return f"{tuple(t.shape)}{str(t.dtype).removeprefix('torch.')}{'' if t.is_contiguous() else '(nc)'}"

        parts = [f"{k}={d(v)}" for k, v in self.inputs().items()]
        extra = f" cu={self.cu_seqlens.tolist()}" if self.cu_seqlens is not None else ""
        return (
            f"Case[{self.label}] {self.norm} gated={self.gated} eps={self.eps} R={self.batch_repeat}"
            f"{extra} " + " ".join(parts)
        )


def _divisor_group(L: int) -> int:
    """A group count 1 < F < L dividing L when one exists (else 1 for L <= 1, L for prime L)."""
    for f in (2, 3, 5, 7):
        if L % f == 0 and f < L:
            return L // f  # groups of f rows
    return 1 if L <= 1 else L


def make_case(
    layout: str = "sample",
    *,
    norm: str = "layernorm",
    affine: str = "none",
    gate: str = "off",
    dtype: torch.dtype = torch.float32,
    mod_dtype: torch.dtype | None = None,
    o_dtype: torch.dtype | None = None,
    affine_dtype: torch.dtype | None = None,
    B: int = 2,
    L: int = 4,
    D: int = 8,
    R: int = 3,
    groups: int | None = None,
    seqlens: Sequence[int] | None = None,
    eps: float = 1e-6,
    seed: int = 0,
    device: str | torch.device = "cpu",
    x_offset: float = 0.5,
    x_scale: float = 2.0,
) -> Case:
    """Random inputs (drawn on the CPU with a seeded generator, so every device sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    mod_dtype = mod_dtype or torch.float32
    o_dtype = o_dtype or dtype
    affine_dtype = affine_dtype or torch.float32

    def rnd(*shape, scale=1.0, offset=0.0, dt=torch.float32):
        return (torch.randn(*shape, generator=gen) * scale + offset).to(dt).to(device)

    cu = None
    max_seqlen = None
    batch_repeat = 1
    if layout in VARLEN_LAYOUTS:
        if seqlens is None:
            nseq = max(B, 3)  # at least three sequences, the second one empty
            seqlens = [int(v) for v in torch.randint(1, 2 * L + 1, (nseq,), generator=gen)]
            seqlens[1] = 0
        B = len(seqlens)
        offsets = [0]
        for n in seqlens:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        max_seqlen = max(seqlens) if seqlens else 0
        x_shape = (offsets[-1], D)
    elif layout in ("repeat", "repeat_frame"):
        batch_repeat = R
        x_shape = (R * B, L, D)
    else:
        x_shape = (B, L, D)

    x = rnd(*x_shape, scale=x_scale, offset=x_offset if norm == "layernorm" else 0.0, dt=dtype)

    # modulation shape
    if layout in ("global", "varlen_global"):
        mshape = (D,)
    elif layout in ("sample", "scale_only", "shift_only", "repeat", "varlen"):
        mshape = (B, D)
    elif layout == "sample3":
        mshape = (B, 1, D)
    elif layout in ("frame", "repeat_frame"):
        G = groups if groups is not None else _divisor_group(L)
        mshape = (B, G, D)
    elif layout == "token":
        mshape = (B, L, D)
    elif layout in ("none", "chunk"):
        mshape = None
    else:
        raise ValueError(f"unknown layout {layout!r}")

    scale = shift = gate_t = None
    if layout == "chunk":
        e = rnd(B, 6, D, scale=0.5, dt=mod_dtype)
        chunks = e.chunk(6, dim=1)
        shift, scale, gate_t = chunks[0], chunks[1], chunks[2]
    elif mshape is not None:
        if layout != "shift_only":
            scale = rnd(*mshape, scale=0.5, dt=mod_dtype)
        if layout != "scale_only":
            shift = rnd(*mshape, scale=0.5, dt=mod_dtype)
        gate_t = rnd(*mshape, scale=1.0, dt=mod_dtype)
    else:
        gate_t = rnd(D, dt=mod_dtype)  # no modulation layout: a global gate is still allowed

    o = None
    gated = gate != "off"
    if gated:
        o = rnd(*x_shape, dt=o_dtype)
        if gate == "none":
            gate_t = None
    else:
        gate_t = None

    weight = bias = None
    if affine in ("weight", "weight_bias"):
        weight = rnd(D, scale=0.3, offset=1.0, dt=affine_dtype)
    if affine == "weight_bias":
        bias = rnd(D, scale=0.3, dt=affine_dtype)

    return Case(
        x=x,
        scale=scale,
        shift=shift,
        weight=weight,
        bias=bias,
        o=o,
        gate=gate_t,
        gated=gated,
        norm=norm,
        eps=eps,
        batch_repeat=batch_repeat,
        cu_seqlens=cu,
        max_seqlen=max_seqlen,
        label=f"{layout}/{norm}/{affine}/gate={gate}/{str(dtype).removeprefix('torch.')}",
    )


def call_op(case: Case):
    """The public op: returns (x_out, y) for gated cases and (None, y) otherwise."""
    import difforge  # noqa: PLC0415 - imported lazily so that collection works before the build

    if case.gated:
        x_out, y = difforge.ops.gated_adaln_modulate(case.x, case.o, case.gate, case.scale, case.shift, **case.kwargs())
        return x_out, y
    return None, difforge.ops.adaln_modulate(case.x, case.scale, case.shift, **case.kwargs())


def raw_args(case: Case) -> tuple:
    """Positional arguments of torch.ops.difforge.adaln_modulate / gated_adaln_modulate for ``case``."""
    tail = (
        case.weight,
        case.bias,
        case.norm,
        float(case.eps),
        int(case.batch_repeat),
        case.cu_seqlens,
        int(case.max_seqlen or 0),
    )
    if case.gated:
        return (case.x, case.o, case.gate, case.scale, case.shift) + tail
    return (case.x, case.scale, case.shift) + tail


def call_raw(case: Case):
    """The raw op: returns (x_out or None, y, mean, rstd)."""
    if case.gated:
        return tuple(torch.ops.difforge.gated_adaln_modulate(*raw_args(case)))
    y, mean, rstd = torch.ops.difforge.adaln_modulate(*raw_args(case))
    return None, y, mean, rstd


def op_grads(case: Case, dy: torch.Tensor, dx_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the op w.r.t. every input tensor of ``case`` (which must require grad)."""
    x_out, y = call_op(case)
    outs, gouts = [y], [dy]
    if case.gated and dx_out is not None:
        outs.append(x_out)
        gouts.append(dx_out)
    names = list(case.inputs())
    grads = torch.autograd.grad(outs, [case.inputs()[n] for n in names], gouts, allow_unused=True)
    return dict(zip(names, grads))


def ref_grads(case: Case, dy: torch.Tensor, dx_out: torch.Tensor | None = None, compute=torch.float64):
    """Gradients of the oracle (autograd through ``reference``) in ``compute`` precision."""
    rc = case.leaf_copies(compute)
    r = reference(rc, compute, round_x_out=False)
    outs, gouts = [r.y], [dy.to(compute)]
    if case.gated and dx_out is not None:
        outs.append(r.x_out)
        gouts.append(dx_out.to(compute))
    names = list(rc.inputs())
    grads = torch.autograd.grad(outs, [rc.inputs()[n] for n in names], gouts, allow_unused=True)
    return {n: (torch.zeros_like(rc.inputs()[n]) if g is None else g) for n, g in zip(names, grads)}


def eager_grads(case: Case, dy: torch.Tensor, dx_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    rc = case.leaf_copies()
    x_out, y = eager(rc)
    outs, gouts = [y], [dy]
    if case.gated and dx_out is not None:
        outs.append(x_out)
        gouts.append(dx_out)
    names = list(rc.inputs())
    grads = torch.autograd.grad(outs, [rc.inputs()[n] for n in names], gouts, allow_unused=True)
    return {n: (torch.zeros_like(rc.inputs()[n]) if g is None else g) for n, g in zip(names, grads)}


# ---------------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------------


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at |ref| (float64 tensor), floored at the smallest subnormal."""
    fi = torch.finfo(dtype)
    a = ref.double().abs()
    exp = torch.floor(torch.log2(a.clamp_min(fi.tiny)))
    return (torch.exp2(exp) * fi.eps).clamp_min(fi.tiny * fi.eps)


def assert_close_fa(got, ref, eager_val, *, slack: float, what: str, factor: float = 2.0):
    """FlashAttention-style bound: max|got - ref| <= factor * max|eager - ref| + slack."""
    e_got = max_abs_err(got, ref)
    e_eager = max_abs_err(eager_val, ref)
    bound = factor * e_eager + slack
    assert e_got <= bound, (
        f"{what}: max abs error {e_got:.3g} exceeds {factor} x eager's {e_eager:.3g} + {slack:.3g} = {bound:.3g}"
    )


def assert_within_ulps(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, ulps=1.0, atol=0.0, what=""):
    """Every element within ``ulps`` output ulps (at the oracle's magnitude) of the oracle, plus atol."""
    tol = ulp(ref, dtype) * ulps + atol
    err = (got.double() - ref.double()).abs()
    bad = err > tol
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond {ulps} ulp; first at flat index {i}: "
            f"got {got.flatten()[i].item()!r}, oracle {ref.flatten()[i].item()!r}, tol {tol.flatten()[i].item():.3g}"
        )
