"""Test library of the flash attention family (cpp/include/difforge/attention.h has the math).

Three parts:

1. The oracle: a plain-PyTorch composition, ``softmax(scale * q k^T + bias + mask) v``, evaluated one
   sequence at a time (batch rows, or the packed sequences of the varlen layout cut out with Python slices
   from ``cu_seqlens``) with an explicit boolean visibility mask built from the contract:

       visible(i, j) = j < k_len  and  (not causal or j <= i + k_len - q_len)      (bottom-right causal)
       k_len = min(keys stored, seqused_k[b])

   GQA by ``repeat_interleave`` of the kv heads, the rank-R bias as the explicit ``Lq x Lk`` matrix
   ``einsum(bias_q, bias_k)``, lse by ``logsumexp``. A row without visible keys gives out 0, lse -inf,
   and (by construction of the ``where``s below) zero, finite gradients. It never calls difforge.
2. The same composition in the inputs' own dtype ("eager"): the yardstick of the accuracy criterion
   (FlashAttention-style: the op may be at most ~2x as far from the fp64 oracle as eager is).
3. Case builders (``make_case``), callers of the op (``call_op``, ``raw_args``), gradient helpers and
   the accuracy assertions.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence

import pytest
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
ALL_DTYPES = (*FLOAT_DTYPES, torch.float64)  # float64: the CPU-only gradcheck path

# Absolute floor of the accuracy criterion, relative to the magnitude of the reference (max(1, max|ref|)):
# small enough that a kernel one rounding step worse than eager still fails on bf16/fp16, large enough that
# fp32 cases (where eager is itself ~1e-7 off) do not flake on summation order.
ACC_FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10, torch.float64: 1e-10}

# Layouts of q/k/v (all with stride 1 in the last dim, as the contract requires).
LAYOUTS = (
    "contiguous",
    "fused_qkv",  # views of one fused projection: [B, L, 3, H, D] (Hq == Hkv) or [B, L, Hq + 2 Hkv, D] (GQA)
    "head_major",  # [B, H, L, D] storage seen as [B, L, H, D] (row stride D, head stride L*D)
    "padded",  # [..., D] slices of a [..., D + 8] buffer
)


def stable_seed(*parts) -> int:
    """A seed derived from test parameters, identical in every process (unlike hash())."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def bias_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """dtype of the bias features used with inputs of ``dtype`` (fp32; fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------


def clone_strided(t: torch.Tensor, *, dtype=None, device=None) -> torch.Tensor:
    """A detached copy with the same sizes and strides (a view of a fused buffer stays non-contiguous)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=device or t.device)
    with torch.no_grad():
        out.copy_(t.detach())
    return out


DIFF_NAMES = ("q", "k", "v", "bias_q", "bias_k")


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None = None
    causal: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    seqused_k: torch.Tensor | None = None
    bias_q: torch.Tensor | None = None
    bias_k: torch.Tensor | None = None
    label: str = ""

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    def inputs(self) -> dict[str, torch.Tensor]:
        """The differentiable tensors present, by name."""
        return {n: getattr(self, n) for n in DIFF_NAMES if getattr(self, n) is not None}

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)

    def map_inputs(self, fn) -> "Case":
        return self.replace(**{n: fn(t) for n, t in self.inputs().items()})

    def leaf_copies(self, dtype: torch.dtype | None = None, *, bias_dtype: torch.dtype | None = None) -> "Case":
        """Leaf copies requiring grad, with the original strides. ``dtype`` converts q/k/v (and the bias
        features unless ``bias_dtype`` is given)."""

        def conv(name, t):
            dt = (bias_dtype or dtype) if name.startswith("bias") else dtype
            return clone_strided(t, dtype=dt).requires_grad_(True)

        return self.replace(**{n: conv(n, t) for n, t in self.inputs().items()})

    def to(self, device) -> "Case":
        c = self.map_inputs(lambda t: clone_strided(t, device=device))
        ints = {}
        for n in ("cu_seqlens_q", "cu_seqlens_k", "seqused_k"):
            t = getattr(self, n)
            if t is not None:
                ints[n] = t.to(device)
        return c.replace(**ints)

    def kwargs(self) -> dict:
        """Keyword arguments of difforge.ops.flash_attention (besides q, k, v)."""
        return dict(
            scale=self.scale,
            causal=self.causal,
            cu_seqlens_q=self.cu_seqlens_q,
            cu_seqlens_k=self.cu_seqlens_k,
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_k=self.max_seqlen_k,
            seqused_k=self.seqused_k,
            logit_bias_q=self.bias_q,
            logit_bias_k=self.bias_k,
        )

    def seq_bounds(self) -> list[tuple[int, int, int, int]]:
        """Per sequence: (q_begin, q_end, k_begin, k_end) along the row dim (batch: (0, Lq, 0, Lk))."""
        if self.varlen:
            cq = [int(x) for x in self.cu_seqlens_q.cpu().tolist()]
            ck = [int(x) for x in self.cu_seqlens_k.cpu().tolist()]
            return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]
        return [(0, self.q.shape[1], 0, self.k.shape[1])] * self.q.shape[0]

    def k_lens(self) -> list[int]:
        """Keys each sequence attends to: the stored ones, capped by seqused_k."""
        stored = [ke - kb for (_, _, kb, ke) in self.seq_bounds()]
        if self.seqused_k is None:
            return stored
        used = [int(x) for x in self.seqused_k.cpu().tolist()]
        return [min(s, max(u, 0)) for s, u in zip(stored, used)]

    def __repr__(self) -> str:  # short, for failure messages
        def d(t):
            if t is None:
                return "None"
            nc = "" if t.is_contiguous() else f"(strides {tuple(t.stride())})"
            return f"{tuple(t.shape)}{DTYPE_IDS.get(t.dtype, t.dtype)}{nc}"

        parts = [f"{n}={d(t)}" for n, t in self.inputs().items()]
        extra = ""
        if self.varlen:
            extra += f" cu_q={self.cu_seqlens_q.tolist()} cu_k={self.cu_seqlens_k.tolist()}"
            extra += f" max=({self.max_seqlen_q},{self.max_seqlen_k})"
        if self.seqused_k is not None:
            extra += f" seqused_k={self.seqused_k.tolist()}"
        return f"Case[{self.label}] causal={self.causal} scale={self.scale}{extra} " + " ".join(parts)


def _offsets(lens: Sequence[int]) -> list[int]:
    off = [0]
    for n in lens:
        off.append(off[-1] + int(n))
    return off


def make_case(
    *,
    B: int = 2,
    Lq: int = 16,
    Lk: int | None = None,
    Hq: int = 4,
    Hkv: int | None = None,
    D: int = 16,
    dtype: torch.dtype = torch.float32,
    causal: bool = False,
    scale: float | None = None,
    seqlens_q: Sequence[int] | None = None,
    seqlens_k: Sequence[int] | None = None,
    give_max_seqlen: bool = True,
    seqused_k: Sequence[int] | None = None,
    bias_rank: int = 0,
    bias_dtype: torch.dtype | None = None,
    bias_k_zero_keys: Sequence[int] | None = None,
    layout: str = "contiguous",
    q_gain: float = 1.5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    label: str = "",
) -> Case:
    """Random inputs drawn on the CPU with a seeded generator (every device sees the same values).

    Batch layout unless ``seqlens_q`` / ``seqlens_k`` are given (packed varlen, B = len(seqlens_q)).
    ``bias_k_zero_keys``: key rows (per sequence, batch layout) whose bias features are zeroed
    (the Jensen correction only touches quantized keys).
    """
    gen = torch.Generator().manual_seed(seed)
    Lk = Lq if Lk is None else Lk
    Hkv = Hq if Hkv is None else Hkv
    bias_dtype = bias_dtype or bias_dtype_for(dtype)
    varlen = seqlens_q is not None
    if varlen:
        assert seqlens_k is not None and len(seqlens_k) == len(seqlens_q)
        B = len(seqlens_q)
        rows_q, rows_k = sum(seqlens_q), sum(seqlens_k)
        lead_q, lead_k = (rows_q,), (rows_k,)
    else:
        lead_q, lead_k = (B, Lq), (B, Lk)

    def rnd(*shape, gain=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * gain

    qf = rnd(*lead_q, Hq, D, gain=q_gain)
    kf = rnd(*lead_k, Hkv, D)
    vf = rnd(*lead_k, Hkv, D)

    if layout == "contiguous":
        q, k, v = (t.to(dtype).to(device) for t in (qf, kf, vf))
    elif layout == "fused_qkv":
        assert lead_q == lead_k, "fused_qkv needs Lq == Lk (the same rows)"
        if Hq == Hkv:
            qkv = torch.stack([qf, kf, vf], dim=-3).to(dtype).to(device)  # [..., L, 3, H, D]
            q, k, v = qkv.unbind(dim=-3)
        else:
            qkv = torch.cat([qf, kf, vf], dim=-2).to(dtype).to(device)  # [..., L, Hq + 2 Hkv, D]
            q, k, v = qkv.split([Hq, Hkv, Hkv], dim=-2)
    elif layout == "head_major":

        def hm(t):  # [..., L, H, D] values stored as [..., H, L, D]
            return t.transpose(-3, -2).contiguous().to(dtype).to(device).transpose(-3, -2)

        q, k, v = hm(qf), hm(kf), hm(vf)
    elif layout == "padded":

        def pad(t):
            buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 8, dtype=dtype, device=device)
            buf[..., : t.shape[-1]] = t.to(dtype)
            return buf[..., : t.shape[-1]]

        q, k, v = pad(qf), pad(kf), pad(vf)
    else:
        raise ValueError(f"unknown layout {layout!r}")

    bias_q = bias_k = None
    if bias_rank:
        bq = rnd(*lead_q, Hq, bias_rank, gain=0.5)
        bk = rnd(*lead_k, Hkv, bias_rank, gain=0.5)
        if bias_k_zero_keys is not None:
            bk[..., list(bias_k_zero_keys), :, :] = 0.0
        bias_q, bias_k = bq.to(bias_dtype).to(device), bk.to(bias_dtype).to(device)

    cu_q = cu_k = None
    max_q = max_k = None
    if varlen:
        cu_q = torch.tensor(_offsets(seqlens_q), dtype=torch.int32, device=device)
        cu_k = torch.tensor(_offsets(seqlens_k), dtype=torch.int32, device=device)
        if give_max_seqlen:
            max_q, max_k = max(seqlens_q, default=0), max(seqlens_k, default=0)
    used = None if seqused_k is None else torch.tensor(list(seqused_k), dtype=torch.int32, device=device)
    return Case(q=q, k=k, v=v, scale=scale, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                max_seqlen_q=max_q, max_seqlen_k=max_k, seqused_k=used, bias_q=bias_q, bias_k=bias_k,
                label=label)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Oracle (no difforge)
# ---------------------------------------------------------------------------------------------------------


def visible_mask(q_len: int, k_len: int, causal: bool, device=None) -> torch.Tensor:
    """[q_len, k_len] bool: key j visible to query i (bottom-right aligned causal)."""
    i = torch.arange(q_len, device=device).view(-1, 1)
    j = torch.arange(k_len, device=device).view(1, -1)
    vis = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        vis = j <= i + (k_len - q_len)
    return vis


def masked_attention(logits: torch.Tensor, mask: torch.Tensor, v: torch.Tensor):
    """logits [H, Lq, Lk], mask [Lq, Lk], v [Lk, H, D] -> (out [Lq, H, D], lse [H, Lq]).

    Rows without visible keys: out 0, lse -inf; gradients through them are 0 (the masked branch of each
    ``where`` is a constant).
    """
    has = mask.any(dim=-1)  # [Lq]
    fill = torch.where(has, float("-inf"), 0.0).to(logits.dtype).view(-1, 1)  # finite logits for empty rows
    z = torch.where(mask, logits, fill)
    lse_all = torch.logsumexp(z, dim=-1)  # [H, Lq]
    lse = torch.where(has, lse_all, torch.full_like(lse_all, float("-inf")))
    p = torch.where(mask, torch.softmax(z, dim=-1), torch.zeros((), dtype=z.dtype, device=z.device))
    out = torch.einsum("hij,jhd->ihd", p, v)
    return out, lse


def reference(case: Case, compute: torch.dtype = torch.float64):
    """``(out, lse)`` of the contract computed in ``compute`` precision, in the op's layouts.

    out: q's shape; lse: [B, Hq, Lq] (batch) or [Hq, total_q] (varlen). Differentiable w.r.t. every tensor
    of the case. With ``compute`` the case dtype this is the "eager" composition of the accuracy criterion.
    """
    c = case
    q, k, v = c.q.to(compute), c.k.to(compute), c.v.to(compute)
    bq = None if c.bias_q is None else c.bias_q.to(compute)
    bk = None if c.bias_k is None else c.bias_k.to(compute)
    Hq, Hkv = q.shape[-2], k.shape[-2]
    assert Hq % Hkv == 0
    g = Hq // Hkv
    outs, lses = [], []
    for b, ((qb0, qb1, kb0, kb1), k_len) in enumerate(zip(c.seq_bounds(), c.k_lens())):
        if c.varlen:
            qs, ks, vs = q[qb0:qb1], k[kb0:kb1], v[kb0:kb1]
            bqs = None if bq is None else bq[qb0:qb1]
            bks = None if bk is None else bk[kb0:kb1]
        else:
            qs, ks, vs = q[b], k[b], v[b]
            bqs = None if bq is None else bq[b]
            bks = None if bk is None else bk[b]
        ks, vs = ks[:k_len], vs[:k_len]
        kk = ks.repeat_interleave(g, dim=1)  # [k_len, Hq, D]: query head h reads kv head h // g
        vv = vs.repeat_interleave(g, dim=1)
        logits = torch.einsum("ihd,jhd->hij", qs, kk) * c.softmax_scale
        if bqs is not None:
            bias_matrix = torch.einsum("ihr,jhr->hij", bqs, bks[:k_len].repeat_interleave(g, dim=1))
            logits = logits + bias_matrix
        mask = visible_mask(qs.shape[0], k_len, c.causal, device=q.device)
        o, lse = masked_attention(logits, mask, vv)
        outs.append(o)
        lses.append(lse)
    if c.varlen:
        if not outs:
            return q.new_zeros(q.shape), q.new_zeros((Hq, 0))
        return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
    return torch.stack(outs, dim=0), torch.stack(lses, dim=0)


def explicit_bias_matrix(case: Case, b: int = 0) -> torch.Tensor:
    """[Hq, Lq, Lk] fp64 bias of batch row b: sum_r bias_q[b, i, h, r] * bias_k[b, j, h // g, r] by loops
    over r (a second, independent spelling of the rank-R form)."""
    c = case
    Hq, Hkv = c.q.shape[-2], c.k.shape[-2]
    g = Hq // Hkv
    bq, bk = c.bias_q[b].double(), c.bias_k[b].double()  # [Lq, Hq, R], [Lk, Hkv, R]
    Lq, Lk, R = bq.shape[0], bk.shape[0], bq.shape[-1]
    out = torch.zeros(Hq, Lq, Lk, dtype=torch.float64, device=bq.device)
    for h in range(Hq):
        for r in range(R):
            out[h] += bq[:, h, r].view(-1, 1) * bk[:, h // g, r].view(1, -1)
    return out


# ---------------------------------------------------------------------------------------------------------
# Callers of the op
# ---------------------------------------------------------------------------------------------------------


def call_op(case: Case):
    """``difforge.ops.flash_attention(q, k, v, **case kwargs)`` -> (out, lse)."""
    import difforge

    return difforge.ops.flash_attention(case.q, case.k, case.v, **case.kwargs())


def raw_args(case: Case) -> tuple:
    """Positional arguments of ``torch.ops.difforge.flash_attention`` (the schema order)."""
    c = case
    return (c.q, c.k, c.v, c.scale, c.causal, c.cu_seqlens_q, c.cu_seqlens_k, c.max_seqlen_q or 0,
            c.max_seqlen_k or 0, c.seqused_k, c.bias_q, c.bias_k)  # fmt: skip


def raw_backward_args(case: Case, dout, dlse, out, lse) -> tuple:
    """Positional arguments of ``torch.ops.difforge.flash_attention_backward``."""
    c = case
    return (dout, dlse, c.q, c.k, c.v, out, lse, c.scale, c.causal, c.cu_seqlens_q, c.cu_seqlens_k,
            c.max_seqlen_q or 0, c.max_seqlen_k or 0, c.seqused_k, c.bias_q, c.bias_k)  # fmt: skip


def lse_shape(case: Case) -> tuple[int, ...]:
    q = case.q
    return (q.shape[1], q.shape[0]) if case.varlen else (q.shape[0], q.shape[2], q.shape[1])


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cotangents(case: Case, *, with_lse: bool = True, seed: int = 1):
    """(dout in q's dtype and shape, dlse in the lse dtype or None), drawn on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    dev = case.q.device
    dout = torch.randn(case.q.shape, generator=gen).to(case.dtype).to(dev)
    dlse = torch.randn(lse_shape(case), generator=gen).to(lse_dtype(case.dtype)).to(dev) if with_lse else None
    return dout, dlse


def grads_of(fn, case: Case, dout, dlse, *, compute: torch.dtype | None = None):
    """Gradients w.r.t. every input of ``case`` of ``<out, dout> + <lse, dlse>`` with ``(out, lse) = fn(leaf case)``.

    ``compute``: dtype of the leaf copies (q/k/v; the bias features follow, except that low-precision
    computations keep them in their own dtype and cast inside fn). Returns (out, lse, {name: grad}).
    Rows whose lse is -inf take no lse gradient (where the oracle's lse is -inf the op's must be too).
    """
    if compute is None or compute == case.dtype:
        leaves = case.leaf_copies()
    else:
        leaves = case.leaf_copies(compute)
    out, lse = fn(leaves)
    outs, cots = [out], [dout.to(out.dtype)]
    if dlse is not None:
        finite = torch.isfinite(lse)
        lse_term = torch.where(finite, lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
        outs.append(lse_term)
        cots.append(torch.where(finite, dlse.to(lse.dtype), torch.zeros((), dtype=lse.dtype, device=lse.device)))
    names = list(leaves.inputs())
    grads = torch.autograd.grad(outs, [leaves.inputs()[n] for n in names], cots, allow_unused=True)
    result = {}
    for n, gr in zip(names, grads):
        result[n] = torch.zeros_like(leaves.inputs()[n]) if gr is None else gr
    return out.detach(), lse.detach(), result


def op_grads(case: Case, dout, dlse):
    return grads_of(call_op, case, dout, dlse)


def ref_grads(case: Case, dout, dlse):
    return grads_of(lambda c: reference(c, torch.float64), case, dout.double(), None if dlse is None else dlse.double(),
                    compute=torch.float64)  # fmt: skip


def eager_grads(case: Case, dout, dlse):
    return grads_of(lambda c: reference(c, case.dtype), case, dout, dlse)


# ---------------------------------------------------------------------------------------------------------
# Assertions
# ---------------------------------------------------------------------------------------------------------


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def assert_same_infinities(got: torch.Tensor, ref: torch.Tensor, what: str):
    """Where the oracle is -inf (empty rows' lse) the op must be -inf exactly, and finite elsewhere."""
    ref_inf = torch.isneginf(ref.cpu())
    got_c = got.detach().cpu()
    bad_inf = ref_inf & ~torch.isneginf(got_c)
    where_inf, got_there = bad_inf.nonzero().tolist()[:8], got_c[bad_inf][:8].tolist()
    assert not bad_inf.any(), f"{what}: expected -inf at {where_inf}, got {got_there}"
    bad_fin = ~ref_inf & ~torch.isfinite(got_c)
    where_bad, got_bad = bad_fin.nonzero().tolist()[:8], got_c[bad_fin][:8].tolist()
    assert not bad_fin.any(), f"{what}: non-finite values at {where_bad}: {got_bad}"


def accuracy_error(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, tuple]:
    """Max |got - ref| over the positions where ref is finite, and where it is reached."""
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    diff = torch.where(finite, (got - ref).abs(), torch.zeros((), dtype=torch.float64))
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if diff.numel() == 0:
        return 0.0, ()
    idx = int(diff.argmax())
    return float(diff.max()), tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), diff.shape))


def assert_fa_accuracy(got, ref, eager, dtype, what: str, *, factor: float = 2.0, floor: float | None = None):
    """The accuracy criterion: max|op - ref| <= factor * max|eager - ref| + floor * max(1, max|ref|)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert_same_infinities(got, ref, what)
    err, where = accuracy_error(got, ref)
    err_eager, _ = accuracy_error(eager, ref)
    finite_ref = ref.detach().double()[torch.isfinite(ref.detach())]
    mag = max(1.0, _max_abs(finite_ref))
    floor = ACC_FLOOR[dtype] if floor is None else floor
    bound = factor * err_eager + floor * mag
    if not err <= bound:
        g = got.detach().double().cpu()
        r = ref.detach().double().cpu()
        at = f" at {where}: got {float(g[where]):.6g}, ref {float(r[where]):.6g}" if where else ""
        raise AssertionError(
            f"{what} ({DTYPE_IDS.get(dtype, dtype)}): max error {err:.3g}{at}; eager error {err_eager:.3g}; "
            f"bound {factor} * eager + {floor:.3g} * {mag:.3g} = {bound:.3g}"
        )


def assert_close_ref(got, ref, what: str, *, rtol: float, atol: float):
    """Plain tolerance check against the oracle (scaled by its magnitude), -inf positions exact."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert_same_infinities(got, ref, what)
    err, where = accuracy_error(got, ref)
    mag = max(1.0, _max_abs(ref.detach().double()[torch.isfinite(ref.detach())]))
    assert err <= atol * mag + rtol * mag, f"{what}: max error {err:.3g} at {where} > {atol + rtol:.3g} * {mag:.3g}"


def check_forward(case: Case, *, factor: float = 2.0):
    """Op forward vs the fp64 oracle with the accuracy criterion (vs eager in the case dtype)."""
    out, lse = call_op(case)
    assert out.dtype == case.dtype, (out.dtype, case.dtype)
    assert out.shape == case.q.shape, (tuple(out.shape), tuple(case.q.shape))
    assert out.is_contiguous(), "out must be contiguous"
    assert lse.dtype == lse_dtype(case.dtype), lse.dtype
    assert tuple(lse.shape) == lse_shape(case), (tuple(lse.shape), lse_shape(case))
    assert out.device == case.q.device and lse.device == case.q.device
    with torch.no_grad():
        ref_out, ref_lse = reference(case)
        if case.dtype == torch.float64:
            eag_out, eag_lse = ref_out, ref_lse
        else:
            eag_out, eag_lse = reference(case, case.dtype)
    assert_fa_accuracy(out, ref_out, eag_out, case.dtype, f"out {case!r}", factor=factor)
    assert_fa_accuracy(lse, ref_lse, eag_lse, case.dtype, f"lse {case!r}", factor=factor)
    # rows without visible keys: exactly 0 output
    empty = torch.isneginf(ref_lse)
    if empty.any():
        out_rows = out.detach().cpu().double()
        if case.varlen:
            mask = empty.transpose(0, 1).cpu()  # [total_q, Hq]
        else:
            mask = empty.transpose(1, 2).cpu()  # [B, Lq, Hq]
        assert (out_rows[mask] == 0).all(), f"rows without visible keys must give out 0 {case!r}"
    return out, lse


def check_backward(case: Case, *, with_lse: bool = True, factor: float = 2.0, seed: int = 1):
    """Op gradients (autograd through the registered backward) vs the fp64 oracle's, accuracy criterion."""
    dout, dlse = cotangents(case, with_lse=with_lse, seed=seed)
    _, _, g_op = op_grads(case, dout, dlse)
    _, _, g_ref = ref_grads(case, dout, dlse)
    if case.dtype == torch.float64:
        g_eag = g_ref
    else:
        _, _, g_eag = eager_grads(case, dout, dlse)
    for name, ref in g_ref.items():
        got = g_op[name]
        src = case.inputs()[name]
        assert got.shape == src.shape, (name, tuple(got.shape), tuple(src.shape))
        assert got.dtype == src.dtype, (name, got.dtype, src.dtype)
        assert torch.isfinite(got).all(), f"d{name} has non-finite values {case!r}"
        # the bias features' gradients are accumulated in their own (fp32) dtype: judge them at the
        # precision of the attention inputs all the same (the probabilities they come from are)
        assert_fa_accuracy(got, ref, g_eag[name], case.dtype, f"d{name} {case!r}", factor=factor)
    return g_op, g_ref
