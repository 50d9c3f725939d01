"""Test library of the Skiparse permutation ops (spec: /work/shared/spec/skiparse_ssp.md, §2, §3, §6, §10).

Everything here is plain PyTorch written from the spec, never from the op (no difforge import):

1. Reference maps. The spec's einops maps as reshape/permute on the zero-padded grid

       2D token  b (t h p w q) c -> (p q b) (t h w) c
       2D group  b (t h p1 p2 w q1 q2) c -> (p1 q1 b) (t h p2 w q2) c
       1D token  b (n p) c -> (p b) n c
       1D group  b (n p q) c -> (p b) (n q) c

   give the "padded layout" (padding scattered inside each sub-sequence). The op's layout is compact: each
   sub-sequence holds its valid tokens first, in the same order, and zeros after them, i.e. the padded layout
   followed by a stable partition [valid..., padding...] of every sub-sequence; the validity mask goes through
   the same reference map as the data. ``ref_rearrange`` pushes the data through the einops maps;
   ``ref_restore`` scatters with the slot -> token table of the same maps (``slot_tokens``); ``ref_switch``
   applies the spec's switch einops ``(p2 q2 b) (t a p1 c q1) -> (p1 q1 b) (t a p2 c q2)`` (1D: ``(q b) (n p)
   -> (p b) (n q)``) on the padded layout; ``ref_exchange_send`` is step 1-2 of the SSP switch (§6) and
   ``simulate_all_to_all`` the in-process all_to_all_single with equal splits.
2. The dense-mask oracle of §3.1 / §2 (``skiparse_mask``) on the original N tokens (padded keys do not exist in
   original order) and a masked SDPA reference (``ref_attention``) with explicit softmax.
3. Brute-force valid counts per sub-sequence (``brute_counts``), from the spec's "token i -> s" tables.
4. Checkers: ``assert_bitwise``, ``strided_views`` (non-contiguous copies of a tensor), ``check_attention`` (an
   attention callable, forward and backward, against ``ref_attention``: fixed tolerances or the flash family's
   accuracy criterion of attention_testlib).
"""

from __future__ import annotations

import itertools
import zlib

import torch

from attention_testlib import assert_fa_accuracy

MODES = ("token", "group")
DIMS = (1, 2)
DTYPE_IDS = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "bool",
    torch.uint8: "u8",
}


def stable_seed(*parts) -> int:
    """A seed derived from test parameters, identical in every process (unlike hash())."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def other(mode: str) -> str:
    return "group" if mode == "token" else "token"


def groups(P: int, dims: int = 2) -> int:
    return P * P if dims == 2 else P


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def split_grid(grid, P: int, dims: int) -> tuple[int, int, int, int, int]:
    """(T, H, W, H', W') of the split: 2D pads H and W to multiples of P^2; 1D is the flat (1, 1, N) padded to
    N' = ceil(N / P^2) * P^2 (spec §1)."""
    T, H, W = (int(g) for g in grid)
    if dims == 1:
        N = T * H * W
        return 1, 1, N, 1, ceil_to(N, P * P)
    return T, H, W, ceil_to(H, P * P), ceil_to(W, P * P)


def seq_len(grid, P: int, dims: int = 2) -> int:
    """N' / G."""
    T, _, _, Hp, Wp = split_grid(grid, P, dims)
    return T * Hp * Wp // groups(P, dims)


def random_tensor(shape, dtype: torch.dtype, seed: int = 0, device="cpu") -> torch.Tensor:
    """Values drawn on the CPU (every device sees the same ones); distinct nonzero-ish values for every dtype."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=gen).bool()
    elif dtype.is_floating_point:
        t = torch.randn(shape, generator=gen).to(dtype)
    else:
        t = torch.randint(1, 100 if dtype == torch.uint8 else 10**6, shape, generator=gen).to(dtype)
    return t.to(device)


# ---------------------------------------------------------------------------------------------------------
# Padded layout: the spec's einops maps, literally
# ---------------------------------------------------------------------------------------------------------


def _pad_grid(x3: torch.Tensor, grid, P: int, dims: int) -> torch.Tensor:
    """x [B, N, C] in original order -> zero-padded grid [B, T, H', W', C] (1D: [B, 1, 1, N', C])."""
    B, _, C = x3.shape
    T, H, W, Hp, Wp = split_grid(grid, P, dims)
    out = x3.new_zeros((B, T, Hp, Wp, C))
    out[:, :, :H, :W] = x3.reshape(B, T, H, W, C)
    return out


def padded_layout(x3: torch.Tensor, grid, P: int, mode: str, dims: int = 2) -> torch.Tensor:
    """x [B, N, C] -> the spec's padded sparse layout [G * B, N' / G, C] (row s * B + b)."""
    B, _, C = x3.shape
    xp = _pad_grid(x3, grid, P, dims)
    T, _, _, Hp, Wp = split_grid(grid, P, dims)
    if dims == 1:
        flat = xp.reshape(B, Wp, C)
        if mode == "token":  # b (n p) c -> (p b) n c
            return flat.reshape(B, Wp // P, P, C).permute(2, 0, 1, 3).reshape(P * B, Wp // P, C)
        # b (n p q) c -> (p b) (n q) c
        n = Wp // (P * P)
        return flat.reshape(B, n, P, P, C).permute(2, 0, 1, 3, 4).reshape(P * B, n * P, C)
    if mode == "token":  # b (t h p w q) c -> (p q b) (t h w) c
        h, w = Hp // P, Wp // P
        y = xp.reshape(B, T, h, P, w, P, C).permute(3, 5, 0, 1, 2, 4, 6)
        return y.reshape(P * P * B, T * h * w, C)
    # b (t h p1 p2 w q1 q2) c -> (p1 q1 b) (t h p2 w q2) c
    h, w = Hp // (P * P), Wp // (P * P)
    y = xp.reshape(B, T, h, P, P, w, P, P, C).permute(3, 6, 0, 1, 2, 4, 5, 7, 8)
    return y.reshape(P * P * B, T * h * P * w * P, C)


def valid_mask(grid, P: int, mode: str, dims: int = 2) -> torch.Tensor:
    """bool [G, N' / G]: slot of the padded layout holds a real token (a ones mask through the same map)."""
    N = int(grid[0]) * int(grid[1]) * int(grid[2])
    ones = torch.ones(1, N, 1, dtype=torch.bool)
    return padded_layout(ones, grid, P, mode, dims)[:, :, 0]


def compaction(grid, P: int, mode: str, dims: int = 2) -> torch.Tensor:
    """long [G, N' / G]: compact slot j of sub-sequence s takes padded slot ``perm[s, j]`` (stable partition of
    every sub-sequence into [valid..., padding...])."""
    valid = valid_mask(grid, P, mode, dims)
    key = (~valid).to(torch.int64)  # valid first
    return torch.sort(key, dim=1, stable=True).indices


def compact_valid(grid, P: int, mode: str, dims: int = 2) -> torch.Tensor:
    """bool [G, N' / G]: valid slots of the compact layout (a prefix of every row)."""
    valid = valid_mask(grid, P, mode, dims)
    return torch.gather(valid, 1, compaction(grid, P, mode, dims))


def slot_tokens(grid, P: int, mode: str, dims: int = 2) -> torch.Tensor:
    """long [G, N' / G]: original flat token index held by each slot of the compact layout, -1 for padding."""
    N = int(grid[0]) * int(grid[1]) * int(grid[2])
    idx = (torch.arange(N, dtype=torch.int64) + 1).view(1, N, 1)  # 0 marks padding
    padded = padded_layout(idx, grid, P, mode, dims)[:, :, 0]
    return torch.gather(padded, 1, compaction(grid, P, mode, dims)) - 1


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1)


def _compact(padded: torch.Tensor, grid, P: int, mode: str, dims: int, B: int) -> torch.Tensor:
    """Padded layout [G * B, L, C] -> compact layout (padding zeroed)."""
    G, L = groups(P, dims), padded.shape[1]
    perm = compaction(grid, P, mode, dims)  # [G, L]
    valid = compact_valid(grid, P, mode, dims)
    idx = perm.repeat_interleave(B, dim=0).view(G * B, L, 1).expand(-1, -1, padded.shape[2])
    out = torch.gather(padded, 1, idx.to(padded.device))
    keep = valid.repeat_interleave(B, dim=0).view(G * B, L, 1).to(padded.device)
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _uncompact(compact: torch.Tensor, grid, P: int, mode: str, dims: int, B: int) -> torch.Tensor:
    """Compact layout [G_any * B, L, C] (rows of sub-sequences in order, starting at 0) -> padded layout;
    whatever the padded slots of the input hold is dropped."""
    rows, L, C = compact.shape
    G = rows // B
    perm = compaction(grid, P, mode, dims)[:G]
    valid = compact_valid(grid, P, mode, dims)[:G]
    keep = valid.repeat_interleave(B, dim=0).view(rows, L, 1).to(compact.device)
    src = torch.where(keep, compact, torch.zeros((), dtype=compact.dtype, device=compact.device))
    out = torch.zeros_like(compact)
    idx = perm.repeat_interleave(B, dim=0).view(rows, L, 1).expand(-1, -1, C).to(compact.device)
    return out.scatter(1, idx, src)


def _local(t: torch.Tensor, G: int, B: int, ssp_rank: int, ssp_size: int) -> torch.Tensor:
    gl = G // ssp_size
    return t[ssp_rank * gl * B : (ssp_rank + 1) * gl * B]


# ---------------------------------------------------------------------------------------------------------
# Reference ops
# ---------------------------------------------------------------------------------------------------------


def ref_rearrange(x, grid, P: int, mode: str, dims: int = 2, ssp_rank: int = 0, ssp_size: int = 1):
    """[B, N, ...] -> local compact rows [G / S * B, N' / G, ...] (data pushed through the einops maps)."""
    x = x.detach().cpu()
    B, N = x.shape[:2]
    trailing = x.shape[2:]
    padded = padded_layout(x.reshape(B, N, -1), grid, P, mode, dims)
    out = _compact(padded, grid, P, mode, dims, B)
    out = _local(out, groups(P, dims), B, ssp_rank, ssp_size)
    return out.reshape(out.shape[0], out.shape[1], *trailing)


def ref_restore(xs, grid, P: int, mode: str, dims: int = 2, ssp_rank: int = 0, ssp_size: int = 1):
    """Local compact rows -> [B, N, ...] by scattering with ``slot_tokens``; other ranks' tokens are zeros."""
    xs = xs.detach().cpu()
    G = groups(P, dims)
    gl = G // ssp_size
    B = xs.shape[0] // gl
    N = int(grid[0]) * int(grid[1]) * int(grid[2])
    x3 = _rows(xs)
    out = x3.new_zeros((B, N, x3.shape[2]))
    table = slot_tokens(grid, P, mode, dims)
    for sl in range(gl):
        tok = table[ssp_rank * gl + sl]
        used = tok >= 0
        for b in range(B):
            out[b, tok[used]] = x3[sl * B + b, used]
    return out.reshape(B, N, *xs.shape[2:])


def _switch_padded(padded: torch.Tensor, grid, P: int, dims: int, B: int) -> torch.Tensor:
    """The spec's switch on the padded layout (its own inverse)."""
    C = padded.shape[2]
    T, _, _, Hp, Wp = split_grid(grid, P, dims)
    if dims == 1:  # (q b) (n p) c -> (p b) (n q) c
        n = Wp // (P * P)
        return padded.reshape(P, B, n, P, C).permute(3, 1, 2, 0, 4).reshape(P * B, n * P, C)
    # (p2 q2 b) (t a p1 c q1) x -> (p1 q1 b) (t a p2 c q2) x
    a, c = Hp // (P * P), Wp // (P * P)
    y = padded.reshape(P, P, B, T, a, P, c, P, C).permute(5, 7, 2, 3, 4, 0, 6, 1, 8)
    return y.reshape(P * P * B, T * a * P * c * P, C)


def ref_switch(xs, grid, P: int, from_mode: str, dims: int = 2):
    """All compact rows in ``from_mode`` -> the other mode, through the spec's switch einops."""
    xs = xs.detach().cpu()
    G = groups(P, dims)
    B = xs.shape[0] // G
    padded = _uncompact(_rows(xs), grid, P, from_mode, dims, B)
    out = _compact(_switch_padded(padded, grid, P, dims, B), grid, P, other(from_mode), dims, B)
    return out.reshape(xs.shape)


def exchange_base(grid, P: int, dims: int = 2) -> int:
    """T * H'/P^2 * W'/P^2 (1D: N'/P^2): the tokens one token sub-sequence shares with one group sub-sequence."""
    T, _, _, Hp, Wp = split_grid(grid, P, dims)
    return T * Hp * Wp // (P * P) ** (2 if dims == 2 else 1)


def ref_exchange_send(xs_local, grid, P: int, from_mode: str, dims: int, ssp_rank: int, ssp_size: int):
    """Steps 1-2 of the SSP switch (§6) on the padded layout of the local rows: ``(sl b) (t a p1 c q1) x ->
    (p1 q1 sl b) (t a c) x`` (1D ``(sl b) (n p1) x -> (p1 sl b) n x``), viewed [S, G_loc * G_loc * B * base, ...]."""
    xs_local = xs_local.detach().cpu()
    G = groups(P, dims)
    gl = G // ssp_size
    B = xs_local.shape[0] // gl
    x3 = _rows(xs_local)
    C = x3.shape[2]
    # uncompact with this rank's sub-sequences
    perm = compaction(grid, P, from_mode, dims)[ssp_rank * gl : (ssp_rank + 1) * gl]
    valid = compact_valid(grid, P, from_mode, dims)[ssp_rank * gl : (ssp_rank + 1) * gl]
    L = x3.shape[1]
    keep = valid.repeat_interleave(B, dim=0).view(gl * B, L, 1)
    src = torch.where(keep, x3, torch.zeros((), dtype=x3.dtype))
    idx = perm.repeat_interleave(B, dim=0).view(gl * B, L, 1).expand(-1, -1, C)
    padded = torch.zeros_like(x3).scatter(1, idx, src)
    T, _, _, Hp, Wp = split_grid(grid, P, dims)
    if dims == 1:
        n = Wp // (P * P)
        y = padded.reshape(gl, B, n, P, C).permute(3, 0, 1, 2, 4)  # (p1, sl, b, n)
    else:
        a, c = Hp // (P * P), Wp // (P * P)
        y = padded.reshape(gl, B, T, a, P, c, P, C).permute(4, 6, 0, 1, 2, 3, 5, 7)  # (p1, q1, sl, b, t, a, c)
    base = exchange_base(grid, P, dims)
    return y.reshape(ssp_size, gl * gl * B * base, *xs_local.shape[2:])


def simulate_all_to_all(sends: list[torch.Tensor]) -> list[torch.Tensor]:
    """all_to_all_single with equal splits along dim 0: rank r receives chunk r of every rank's buffer."""
    S = len(sends)
    return [torch.stack([sends[i][r] for i in range(S)]) for r in range(S)]


# ---------------------------------------------------------------------------------------------------------
# Dense-mask oracle and masked SDPA
# ---------------------------------------------------------------------------------------------------------


def token_coords(grid, dims: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, h, w) of every original token (w fastest); 1D: (0, 0, i)."""
    T, H, W = (int(g) for g in grid)
    i = torch.arange(T * H * W)
    if dims == 1:
        return torch.zeros_like(i), torch.zeros_like(i), i
    return i // (H * W), (i // W) % H, i % W


def subsequence_of(grid, P: int, mode: str, dims: int = 2) -> torch.Tensor:
    """long [N]: sub-sequence of every original token (spec §2 / §3.1 tables)."""
    _, h, w = token_coords(grid, dims)
    if mode == "token":
        dh, dw = h % P, w % P
    else:
        dh, dw = (h // P) % P, (w // P) % P
    return dh * P + dw if dims == 2 else dw


def skiparse_mask(grid, P: int, mode: str, dims: int = 2) -> torch.Tensor:
    """bool [N, N]: the dense mask M_tok / M_grp of §3.1 (1D: the key sets of §2) on the original tokens."""
    _, h, w = token_coords(grid, dims)
    if mode == "token":
        fh, fw = h % P, w % P
    else:
        fh, fw = (h // P) % P, (w // P) % P
    same_w = fw.view(-1, 1) == fw.view(1, -1)
    if dims == 1:
        return same_w
    return (fh.view(-1, 1) == fh.view(1, -1)) & same_w


def ref_attention(q, k, v, grid, P: int, mode: str, dims: int = 2, scale: float | None = None,
                  compute: torch.dtype = torch.float64) -> torch.Tensor:  # fmt: skip
    """Dense masked softmax attention on the original token order: [B, N, Hq, D] (GQA by repeat_interleave),
    computed in ``compute`` (differentiable). Every query sees at least itself, so no empty rows."""
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    Hq, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    if Hq != Hkv:
        kc, vc = kc.repeat_interleave(Hq // Hkv, dim=2), vc.repeat_interleave(Hq // Hkv, dim=2)
    scale = D**-0.5 if scale is None else scale
    mask = skiparse_mask(grid, P, mode, dims).to(q.device)
    logits = torch.einsum("bihd,bjhd->bhij", qc, kc) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, vc)


# ---------------------------------------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------------------------------------


def brute_counts(grid, P: int, mode: str, dims: int = 2) -> list[int]:
    """Valid tokens per sub-sequence by enumerating every token of the grid with plain Python integers."""
    T, H, W = (int(g) for g in grid)
    counts = [0] * groups(P, dims)
    for t, h, w in itertools.product(range(T), range(H), range(W)):
        if dims == 1:
            i = (t * H + h) * W + w
            s = i % P if mode == "token" else (i // P) % P
        elif mode == "token":
            s = (h % P) * P + (w % P)
        else:
            s = ((h // P) % P) * P + (w // P) % P
        counts[s] += 1
    return counts


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Same shape, dtype and bits (NaN-free inputs; compared on the CPU)."""
    got_c, want_c = got.detach().cpu(), want.detach().cpu()
    assert got_c.shape == want_c.shape, f"{what}: shape {tuple(got_c.shape)} != {tuple(want_c.shape)}"
    assert got_c.dtype == want_c.dtype, f"{what}: dtype {got_c.dtype} != {want_c.dtype}"
    if torch.equal(got_c, want_c):
        return
    diff = (got_c != want_c).reshape(got_c.shape[0], got_c.shape[1], -1).any(-1) if got_c.dim() >= 2 else None
    where = diff.nonzero().tolist()[:8] if diff is not None else "?"
    raise AssertionError(f"{what}: not bitwise equal; first differing (row, position): {where}")


def strided_views(base: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Non-contiguous tensors holding the values of ``base`` [R, L, H, D] (the "row_offset" one as [R, L, H * D])."""
    R, L, H, D = base.shape
    fused = torch.stack([torch.zeros_like(base), base, torch.ones_like(base)], dim=2)  # [R, L, 3, H, D]
    big = torch.zeros(2 * R, 3 * L, H, D, dtype=base.dtype, device=base.device)
    big[::2, ::3] = base
    padded = torch.zeros(R, L, H, D + 3, dtype=base.dtype, device=base.device)
    padded[..., :D] = base
    offset = torch.zeros(R, L, H * D + 1, dtype=base.dtype, device=base.device)
    offset[..., 1:] = base.reshape(R, L, H * D)
    return [
        ("fused_qkv_slice", fused[:, :, 1]),  # read in place
        ("transposed_outer", base.transpose(0, 1).contiguous().transpose(0, 1)),  # [L, R, ...] storage
        ("strided_outer", big[::2, ::3]),
        ("row_offset", offset[..., 1:]),  # rows start one element off: a misaligned in-place read
        ("non_dense_trailing", padded[..., :D]),  # must be copied
        ("head_major_trailing", base.transpose(2, 3).contiguous().transpose(2, 3)),  # must be copied
    ]


# ---------------------------------------------------------------------------------------------------------
# Attention checker
# ---------------------------------------------------------------------------------------------------------


def run_with_grads(fn, q, k, v, dout):
    """(out, (dq, dk, dv)) of ``fn`` on leaf copies, cotangent ``dout``."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), grads


def assert_close_scaled(got, ref, tol: float, what: str) -> None:
    """max |got - ref| <= tol * max(1, max |ref|), got finite."""
    assert got.shape == ref.shape, (what, tuple(got.shape), tuple(ref.shape))
    got_d, ref_d = got.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.isfinite(got_d).all(), f"{what}: non-finite values"
    mag = max(1.0, float(ref_d.abs().max())) if ref_d.numel() else 1.0
    err = float((got_d - ref_d).abs().max()) if ref_d.numel() else 0.0
    assert err <= tol * mag, f"{what}: max error {err:.3g} > {tol:.1g} * {mag:.3g}"


def check_attention(fn, q, k, v, *, grid, P: int, mode: str, dims: int = 2, scale=None, tol: dict | None = None):
    """``fn(q, k, v)`` (the op with its layout bound) forward and backward vs the fp64 masked oracle. dtypes in
    ``tol`` use that fixed tolerance; the others the accuracy criterion (at most ~2x the error of the same masked
    composition evaluated eagerly in the inputs' dtype, plus a small floor)."""
    dtype = q.dtype
    gen = torch.Generator().manual_seed(stable_seed("dout", tuple(grid), P, mode, dims))
    dout = torch.randn(q.shape, generator=gen).to(dtype).to(q.device)
    out, grads = run_with_grads(fn, q, k, v, dout)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device and out.is_contiguous()

    def oracle(compute):
        return lambda a, b, c: ref_attention(a, b, c, grid, P, mode, dims, scale, compute=compute)

    cpu = [t.detach().cpu() for t in (q, k, v, dout)]
    ref_out, ref_grads = run_with_grads(oracle(torch.float64), *[t.double() for t in cpu])
    names = ("dq", "dk", "dv")
    tol = tol or {}
    if dtype in tol:
        assert_close_scaled(out, ref_out, tol[dtype], f"out {mode} {dtype}")
        for name, g, r in zip(names, grads, ref_grads):
            assert g.dtype == dtype
            assert_close_scaled(g, r, tol[dtype], f"{name} {mode} {dtype}")
        return
    eager_out, eager_grads = run_with_grads(oracle(dtype), *cpu)
    assert torch.isfinite(out).all(), "out: non-finite"
    assert_fa_accuracy(out.cpu(), ref_out, eager_out, dtype, f"out {mode}")
    for name, g, r, e in zip(names, grads, ref_grads, eager_grads):
        assert g.dtype == dtype
        assert torch.isfinite(g).all(), f"{name}: non-finite"
        assert_fa_accuracy(g.cpu(), r, e, dtype, f"{name} {mode}")
