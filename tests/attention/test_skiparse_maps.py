"""Skiparse permutation ops (skiparse_rearrange / restore / switch / exchange_send / exchange_receive, skiparse_seqlens)
against the spec (/work/shared/spec/skiparse_ssp.md) and the plain-PyTorch references of skiparse_testlib.

* §2 / §3.2 test vectors verbatim (2D token/group, T=2 H=4 W=8, the padded T=1 H=3 W=5 case in the op's compact form,
  the empty sub-sequences of T=2 H=1 W=6, 1D N=16 P=2 and N=48 P=4, the 720P counts).
* §10 invariants 1, 2, 3, 5, 7: bitwise roundtrips (both modes, both dims), rearrange(restore(xs)) == xs with zeros in
  the padding, switch == rearrange in the other mode, switch involution, P = 1 identity, counts sum to N, two-hop
  connectivity of the masks the op realises.
* The ops against the reference einops maps, SSP (rank slices, restore with zeros elsewhere, the simulated
  all_to_all of exchange_send / exchange_receive == the global switch for every S | G), bit-exact moves of any dtype
  (NaN payloads and -0.0 included), trailing dims of any rank and non-contiguous inputs, and autograd through the
  wrappers (each backward is the reference inverse map).
"""

from __future__ import annotations

import pytest
import torch

from skiparse_testlib import (
    DTYPE_IDS,
    MODES,
    assert_bitwise,
    brute_counts,
    divisors,
    groups,
    other,
    random_tensor,
    ref_exchange_send,
    ref_rearrange,
    ref_restore,
    ref_switch,
    seq_len,
    simulate_all_to_all,
    skiparse_mask,
    split_grid,
    stable_seed,
    strided_views,
    subsequence_of,
)

difforge = pytest.importorskip("difforge")
ops = difforge.ops


def n_tokens(grid) -> int:
    return int(grid[0]) * int(grid[1]) * int(grid[2])


def op_slots(grid, P, mode, dims=2, device="cpu"):
    """[G, N'/G] original token index at every slot of the op's layout, -1 for padding (int64 marker rearranged)."""
    marker = (torch.arange(n_tokens(grid), dtype=torch.int64) + 1).view(1, -1).to(device)
    return (ops.skiparse_rearrange(marker, grid, P, mode, dims=dims) - 1).cpu()


def compact(padded_list):
    """The spec's padded list of one sub-sequence (None = padding) in the op's compact form: valid entries in the
    same order, then the padding."""
    valid = [v for v in padded_list if v is not None]
    return valid + [-1] * (len(padded_list) - len(valid))


def original_of_padded(padded_indices, grid, P):
    """Padded-grid flat indices t*H'*W' + h*W' + w -> original t*H*W + h*W + w (None for padding)."""
    T, H, W, Hp, Wp = split_grid(grid, P, 2)
    out = []
    for p in padded_indices:
        t, rest = divmod(p, Hp * Wp)
        h, w = divmod(rest, Wp)
        out.append((t * H + h) * W + w if h < H and w < W else None)
    return out


# ---- §3.2 / §2 test vectors ------------------------------------------------------------------------------------

VEC_2D = {
    # (grid, mode): sub-sequences as padded-grid flat indices, verbatim from §3.2
    ((1, 4, 4), "token"): [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]],
    ((1, 4, 4), "group"): [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]],
    ((2, 4, 8), "token"): [
        [0, 2, 4, 6, 16, 18, 20, 22, 32, 34, 36, 38, 48, 50, 52, 54],
        [1, 3, 5, 7, 17, 19, 21, 23, 33, 35, 37, 39, 49, 51, 53, 55],  # s0 + 1
        [8, 10, 12, 14, 24, 26, 28, 30, 40, 42, 44, 46, 56, 58, 60, 62],
        [9, 11, 13, 15, 25, 27, 29, 31, 41, 43, 45, 47, 57, 59, 61, 63],  # s2 + 1
    ],
    ((2, 4, 8), "group"): [
        [0, 1, 4, 5, 8, 9, 12, 13, 32, 33, 36, 37, 40, 41, 44, 45],
        [2, 3, 6, 7, 10, 11, 14, 15, 34, 35, 38, 39, 42, 43, 46, 47],  # s0 + 2
        [16, 17, 20, 21, 24, 25, 28, 29, 48, 49, 52, 53, 56, 57, 60, 61],
        [18, 19, 22, 23, 26, 27, 30, 31, 50, 51, 54, 55, 58, 59, 62, 63],  # s2 + 2
    ],
    ((1, 3, 5), "token"): [[0, 2, 4, 6, 16, 18, 20, 22], [1, 3, 5, 7, 17, 19, 21, 23],
                           [8, 10, 12, 14, 24, 26, 28, 30], [9, 11, 13, 15, 25, 27, 29, 31]],  # fmt: skip
    ((1, 3, 5), "group"): [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15],
                           [16, 17, 20, 21, 24, 25, 28, 29], [18, 19, 22, 23, 26, 27, 30, 31]],  # fmt: skip
}
_ = None  # padding in the §3.2 lists below
VEC_PADDED_ORIGINAL = {
    # T=1, H=3, W=5, P=2: padded index -> original index, verbatim from §3.2 (`*` written as _)
    "token": [[0, 2, 4, _, 10, 12, 14, _], [1, 3, _, _, 11, 13, _, _], [5, 7, 9, _, _, _, _, _],
              [6, 8, _, _, _, _, _, _]],  # fmt: skip
    "group": [[0, 1, 4, _, 5, 6, 9, _], [2, 3, _, _, 7, 8, _, _], [10, 11, 14, _, _, _, _, _],
              [12, 13, _, _, _, _, _, _]],  # fmt: skip
}


@pytest.mark.parametrize("grid,mode", list(VEC_2D), ids=[f"{g[0]}x{g[1]}x{g[2]}-{m}" for g, m in VEC_2D])
def test_spec_vectors_2d(device, grid, mode):
    expected = [compact(original_of_padded(s, grid, 2)) for s in VEC_2D[(grid, mode)]]
    assert op_slots(grid, 2, mode, device=device).tolist() == expected


def test_spec_vectors_small_as_coordinates():
    """§3.2: token s0 = (0,0),(0,2),(2,0),(2,2); group s0 = (0,0),(0,1),(1,0),(1,1) (T=1, H=W=4, P=2)."""
    for mode, coords in (("token", [(0, 0), (0, 2), (2, 0), (2, 2)]), ("group", [(0, 0), (0, 1), (1, 0), (1, 1)])):
        assert [divmod(i, 4) for i in op_slots((1, 4, 4), 2, mode)[0].tolist()] == coords


@pytest.mark.parametrize("mode", MODES)
def test_spec_vectors_padded_compact(device, mode):
    """T=1, H=3, W=5, P=2 (H'=4, W'=8): the §3.2 lists with their padding moved to the tail; counts 6, 4, 3, 2."""
    grid = (1, 3, 5)
    spec = VEC_PADDED_ORIGINAL[mode]
    # the two forms of the §3.2 vectors agree (padded indices -> original indices)
    assert [original_of_padded(s, grid, 2) for s in VEC_2D[(grid, mode)]] == spec
    got = op_slots(grid, 2, mode, device=device)
    assert got.tolist() == [compact(s) for s in spec]
    if mode == "token":
        assert got[0].tolist() == [0, 2, 4, 10, 12, 14, -1, -1]  # the example of the brief, literally
    assert (got >= 0).sum(1).tolist() == [6, 4, 3, 2]
    assert ops.skiparse_seqlens(grid, 2, mode).tolist() == [6, 4, 3, 2]


@pytest.mark.parametrize("mode,counts", [("token", [6, 6, 0, 0]), ("group", [8, 4, 0, 0])])
def test_spec_empty_subsequences(device, mode, counts):
    """T=2, H=1, W=6, P=2: H'=4, W'=8, valid counts token [6,6,0,0], group [8,4,0,0]; empty rows are all zeros and
    the roundtrip still holds."""
    grid = (2, 1, 6)
    assert ops.skiparse_seqlens(grid, 2, mode).tolist() == counts
    assert brute_counts(grid, 2, mode) == counts
    slots = op_slots(grid, 2, mode, device=device)
    assert slots.shape == (4, 2 * 4 * 8 // 4)
    assert (slots >= 0).sum(1).tolist() == counts
    x = random_tensor((2, 12, 5), torch.float32, seed=3, device=device)
    xs = ops.skiparse_rearrange(x, grid, 2, mode)
    assert torch.count_nonzero(xs.view(4, 2, -1)[2:]) == 0
    assert_bitwise(ops.skiparse_restore(xs, grid, 2, mode), x, "roundtrip")
    assert_bitwise(xs, ref_rearrange(x, grid, 2, mode), "reference")


VEC_1D = {
    (16, 2, "token"): [list(range(0, 16, 2)), list(range(1, 16, 2))],
    (16, 2, "group"): [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
    (48, 4, "group"): [[0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35], [*range(4, 8), *range(20, 24), *range(36, 40)]],
}


@pytest.mark.parametrize("grid_kind", ["flat", "3d"])
@pytest.mark.parametrize("key", list(VEC_1D), ids=[f"N{n}-P{p}-{m}" for n, p, m in VEC_1D])
def test_spec_vectors_1d(device, key, grid_kind):
    """§2 vectors; dims=1 treats any grid as (1, 1, N)."""
    N, P, mode = key
    grid = (1, 1, N) if grid_kind == "flat" else {16: (2, 2, 4), 48: (3, 4, 4)}[N]
    got = op_slots(grid, P, mode, dims=1, device=device)
    assert got.shape == (P, N // P)
    for s, want in enumerate(VEC_1D[key]):
        assert got[s].tolist() == want, f"sub-sequence {s}"


def test_spec_720p_counts():
    """Wan2.1 720P latent (21, 45, 80), P=2: N' = 80,640 = 4 x 20,160 slots; counts [19320, 19320, 18480, 18480]."""
    grid = (21, 45, 80)
    for mode in MODES:
        counts = ops.skiparse_seqlens(grid, 2, mode)
        assert counts.dtype == torch.int32
        assert counts.tolist() == [19320, 19320, 18480, 18480], mode
    assert ops.skiparse_seq_len(grid, 2) == 20160
    assert 4 * 20160 - sum([19320, 19320, 18480, 18480]) == 5040


# ---- helpers: seqlens, seq_len, groups -------------------------------------------------------------------------

COUNT_GRIDS = [(1, 4, 4), (2, 3, 5), (2, 1, 6), (1, 7, 3), (3, 9, 10), (1, 1, 1), (2, 5, 17)]


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_seqlens_brute_force(P, dims):
    """skiparse_seqlens == brute-force counts, and sum == N (invariant 7), for every mode and grid."""
    for grid in COUNT_GRIDS:
        for mode in MODES:
            counts = ops.skiparse_seqlens(grid, P, mode, dims=dims)
            want = brute_counts(grid, P, mode, dims)
            assert counts.tolist() == want, (grid, mode)
            assert sum(want) == n_tokens(grid)
            assert ops.skiparse_seq_len(grid, P, dims=dims) == seq_len(grid, P, dims)
    assert ops.skiparse_groups(P, dims) == groups(P, dims)


@pytest.mark.parametrize("dims", [1, 2])
def test_seqlens_batch_and_ssp(device, dims):
    """Rows s*B + b of rank r: the counts of sub-sequences [r*G/S, (r+1)*G/S), each repeated B times; equal to the
    valid slots of the op's layout."""
    grid, P, B = (2, 5, 7), 2, 3
    G = groups(P, dims)
    for mode in MODES:
        full = brute_counts(grid, P, mode, dims)
        slots = op_slots(grid, P, mode, dims)
        assert (slots >= 0).sum(1).tolist() == full
        for S in divisors(G):
            for r in range(S):
                got = ops.skiparse_seqlens(grid, P, mode, dims=dims, batch=B, ssp_rank=r, ssp_size=S, device=device)
                assert got.dtype == torch.int32 and got.device.type == torch.device(device).type
                gl = G // S
                assert got.tolist() == [c for c in full[r * gl : (r + 1) * gl] for _ in range(B)], (mode, S, r)


# ---- references and invariants ---------------------------------------------------------------------------------

# (grid, P): no padding, padded H and/or W, empty sub-sequences, P = 3 (G = 9), P = 1
GRIDS = [((2, 4, 8), 2), ((1, 3, 5), 2), ((2, 1, 6), 2), ((3, 5, 2), 2), ((1, 4, 10), 3), ((2, 3, 4), 1),
         ((1, 7, 9), 3)]
GRID_IDS = [f"{g[0]}x{g[1]}x{g[2]}-P{p}" for g, p in GRIDS]


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("grid,P", GRIDS, ids=GRID_IDS)
def test_ops_match_reference_maps(device, grid, P, dims):
    B, C = 2, 3
    x = random_tensor((B, n_tokens(grid), C), torch.float32, seed=stable_seed(grid, P, dims), device=device)
    for mode in MODES:
        xs = ops.skiparse_rearrange(x, grid, P, mode, dims=dims)
        assert xs.shape == (groups(P, dims) * B, seq_len(grid, P, dims), C) and xs.is_contiguous()
        assert xs.device == x.device
        assert_bitwise(xs, ref_rearrange(x, grid, P, mode, dims), f"rearrange {mode}")
        # restore of an arbitrary sparse tensor (not one produced by rearrange): only valid slots are read
        ys = random_tensor(xs.shape, torch.float32, seed=5, device=device)
        assert_bitwise(ops.skiparse_restore(ys, grid, P, mode, dims=dims), ref_restore(ys, grid, P, mode, dims),
                       f"restore {mode}")  # fmt: skip
        assert_bitwise(ops.skiparse_switch(ys, grid, P, mode, dims=dims), ref_switch(ys, grid, P, mode, dims),
                       f"switch from {mode}")  # fmt: skip


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("grid,P", GRIDS, ids=GRID_IDS)
def test_invariants_roundtrip_and_switch(device, grid, P, dims):
    """Invariants 1 and 2, bitwise: restore(rearrange(x)) == x; rearrange(restore(xs)) == xs with zeros in the
    padding (also when the padded slots of the input hold garbage); switch(token(x)) == group(x) and back;
    switch(switch(y)) == y."""
    B = 3
    x = random_tensor((B, n_tokens(grid), 2, 2), torch.bfloat16, seed=stable_seed("inv", grid, P), device=device)
    layout = {m: ops.skiparse_rearrange(x, grid, P, m, dims=dims) for m in MODES}
    for mode in MODES:
        xs = layout[mode]
        assert_bitwise(ops.skiparse_restore(xs, grid, P, mode, dims=dims), x, f"restore(rearrange) {mode}")
        assert_bitwise(ops.skiparse_rearrange(ops.skiparse_restore(xs, grid, P, mode, dims=dims), grid, P, mode,
                                              dims=dims), xs, f"rearrange(restore) {mode}")  # fmt: skip
        garbage = xs.clone()
        used = ref_rearrange(torch.ones(B, n_tokens(grid), dtype=torch.bool), grid, P, mode, dims)
        garbage[~used.to(device)] = 7.0
        assert_bitwise(ops.skiparse_rearrange(ops.skiparse_restore(garbage, grid, P, mode, dims=dims), grid, P, mode,
                                              dims=dims), xs, f"padding garbage dropped {mode}")  # fmt: skip
        switched = ops.skiparse_switch(xs, grid, P, mode, dims=dims)
        assert_bitwise(switched, layout[other(mode)], f"switch from {mode} == rearrange {other(mode)}")
        assert_bitwise(ops.skiparse_switch(switched, grid, P, other(mode), dims=dims), xs, f"involution {mode}")
        assert_bitwise(ops.skiparse_switch(ops.skiparse_switch(garbage, grid, P, mode, dims=dims), grid, P,
                                           other(mode), dims=dims), xs, f"switch^2 drops padding {mode}")  # fmt: skip


@pytest.mark.parametrize("dims", [1, 2])
def test_p1_is_identity(device, dims):
    """Invariant 5: P = 1 is one sub-sequence holding every token in order."""
    grid = (2, 3, 5)
    x = random_tensor((2, 30, 4), torch.float32, seed=11, device=device)
    for mode in MODES:
        assert_bitwise(ops.skiparse_rearrange(x, grid, 1, mode, dims=dims), x, f"rearrange {mode}")
        assert_bitwise(ops.skiparse_restore(x, grid, 1, mode, dims=dims), x, f"restore {mode}")
        assert_bitwise(ops.skiparse_switch(x, grid, 1, mode, dims=dims), x, f"switch {mode}")


def _op_mask(grid, P, mode, dims=2):
    """bool [N, N]: tokens i and i' share a sub-sequence of the op's layout (key set of query i)."""
    slots = op_slots(grid, P, mode, dims)
    sub = torch.empty(n_tokens(grid), dtype=torch.int64)
    for s in range(slots.shape[0]):
        row = slots[s]
        sub[row[row >= 0]] = s
    return sub.view(-1, 1) == sub.view(1, -1)


@pytest.mark.parametrize("grid,P", [((2, 4, 8), 2), ((1, 9, 9), 3), ((2, 5, 6), 2), ((1, 4, 4), 2), ((1, 10, 11), 3)])
def test_masks_and_two_hop_connectivity(grid, P):
    """The sub-sequences of the op's layout are exactly the key sets of the dense masks M_tok / M_grp (§3.1), and
    (M_tok M_grp)[a, b] > 0 for every pair (invariant 7; holds when H, W >= P^2)."""
    masks = {m: _op_mask(grid, P, m) for m in MODES}
    for mode in MODES:
        assert torch.equal(masks[mode], skiparse_mask(grid, P, mode)), mode
        assert torch.equal(subsequence_of(grid, P, mode).view(-1, 1) == subsequence_of(grid, P, mode).view(1, -1),
                           masks[mode])  # fmt: skip
    two_hop = masks["token"].double() @ masks["group"].double()
    assert (two_hop > 0).all()


@pytest.mark.parametrize("P", [2, 3])
def test_masks_1d(P):
    grid = (1, 3, 7)
    for mode in MODES:
        assert torch.equal(_op_mask(grid, P, mode, dims=1), skiparse_mask(grid, P, mode, dims=1)), mode


# ---- SSP -------------------------------------------------------------------------------------------------------

SSP_CASES = [((2, 3, 5), 1, 2), ((2, 3, 5), 1, 1), ((2, 3, 5), 2, 2), ((2, 3, 5), 2, 1), ((1, 4, 10), 3, 2),
             ((2, 1, 6), 2, 2), ((1, 5, 4), 3, 1), ((1, 2, 9), 4, 1)]  # fmt: skip
SSP_IDS = [f"{g[0]}x{g[1]}x{g[2]}-P{p}-{d}d" for g, p, d in SSP_CASES]


@pytest.mark.parametrize("grid,P,dims", SSP_CASES, ids=SSP_IDS)
def test_ssp_rearrange_restore(device, grid, P, dims):
    """For every S | G and rank r: rearrange(rank r) == rows [r*G_loc*B, (r+1)*G_loc*B) of the S=1 layout (and the
    reference); restore(rank r) == the reference (other ranks' tokens zero); sum over ranks restores x."""
    B = 2
    G = groups(P, dims)
    x = random_tensor((B, n_tokens(grid), 3), torch.float32, seed=stable_seed("ssp", grid, P, dims), device=device)
    for mode in MODES:
        full = ops.skiparse_rearrange(x, grid, P, mode, dims=dims)
        for S in divisors(G):
            gl = G // S
            total = torch.zeros_like(x)
            for r in range(S):
                kw = dict(dims=dims, ssp_rank=r, ssp_size=S)
                local = ops.skiparse_rearrange(x, grid, P, mode, **kw)
                assert_bitwise(local, full[r * gl * B : (r + 1) * gl * B], f"rearrange {mode} S={S} r={r}")
                assert_bitwise(local, ref_rearrange(x, grid, P, mode, dims, r, S), f"rearrange ref {mode} S={S} r={r}")
                back = ops.skiparse_restore(local, grid, P, mode, **kw)
                assert_bitwise(back, ref_restore(local, grid, P, mode, dims, r, S), f"restore {mode} S={S} r={r}")
                mine = torch.isin(subsequence_of(grid, P, mode, dims), torch.arange(r * gl, (r + 1) * gl))
                assert torch.count_nonzero(back[:, ~mine.to(device)]) == 0
                assert_bitwise(back[:, mine.to(device)], x[:, mine.to(device)], f"restore own tokens S={S} r={r}")
                total += back
            assert_bitwise(total, x, f"sum over ranks {mode} S={S}")


EXCHANGE_CASES = [((2, 3, 5), 1, 2), ((2, 3, 5), 2, 2), ((1, 4, 4), 2, 2), ((1, 2, 7), 2, 1), ((1, 4, 10), 3, 2),
                  ((2, 1, 6), 2, 2), ((1, 3, 11), 3, 1), ((2, 3, 5), 1, 1)]  # fmt: skip


@pytest.mark.parametrize("grid,P,dims", EXCHANGE_CASES, ids=[f"{g[0]}x{g[1]}x{g[2]}-P{p}-{d}d" for g, p, d in
                                                           EXCHANGE_CASES])  # fmt: skip
def test_ssp_exchange_equals_global_switch(device, grid, P, dims):
    """exchange_send on every rank -> simulated all_to_all_single -> exchange_receive == the rank's rows of the
    global (reference) switch, for every S | G and both directions; the send buffer is steps 1-2 of §6, and
    exchange_receive of reference buffers gives the same result."""
    B = 2
    G = groups(P, dims)
    x = random_tensor((B, n_tokens(grid), 2), torch.float32, seed=stable_seed("xch", grid, P, dims), device=device)
    for mode in MODES:
        xs = ops.skiparse_rearrange(x, grid, P, mode, dims=dims)
        want = ref_switch(xs, grid, P, mode, dims)
        for S in divisors(G):
            gl = G // S
            locals_ = [xs[r * gl * B : (r + 1) * gl * B] for r in range(S)]
            kws = [dict(dims=dims, ssp_rank=r, ssp_size=S) for r in range(S)]
            sends = [ops.skiparse_exchange_send(loc, grid, P, mode, **kw) for loc, kw in zip(locals_, kws)]
            for r, send in enumerate(sends):
                assert send.shape[0] == S and send.is_contiguous()
                assert_bitwise(send, ref_exchange_send(locals_[r], grid, P, mode, dims, r, S), f"send {mode} S={S}")
            recvs = simulate_all_to_all(sends)
            ref_recvs = simulate_all_to_all([ref_exchange_send(loc, grid, P, mode, dims, r, S)
                                             for r, loc in enumerate(locals_)])  # fmt: skip
            for r in range(S):
                got = ops.skiparse_exchange_receive(recvs[r], grid, P, mode, **kws[r])
                assert_bitwise(got, want[r * gl * B : (r + 1) * gl * B], f"exchange {mode} S={S} r={r}")
                got_ref = ops.skiparse_exchange_receive(ref_recvs[r].to(device), grid, P, mode, **kws[r])
                assert_bitwise(got_ref, want[r * gl * B : (r + 1) * gl * B], f"receive(ref) {mode} S={S} r={r}")


# ---- dtypes, trailing dims, strides ---------------------------------------------------------------------------

ANY_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool,
              torch.uint8]  # fmt: skip


@pytest.mark.parametrize("dtype", ANY_DTYPES, ids=[DTYPE_IDS[d] for d in ANY_DTYPES])
def test_any_dtype_bit_exact(device, dtype):
    grid, P, S = (2, 3, 5), 2, 2
    x = random_tensor((2, 30, 3), dtype, seed=stable_seed("dtype", dtype), device=device)
    for dims in (1, 2):
        for mode in MODES:
            xs = ops.skiparse_rearrange(x, grid, P, mode, dims=dims)
            assert xs.dtype == dtype
            assert_bitwise(xs, ref_rearrange(x, grid, P, mode, dims), f"rearrange {mode} {dims}d")
            assert_bitwise(ops.skiparse_restore(xs, grid, P, mode, dims=dims), x, f"restore {mode} {dims}d")
            assert_bitwise(ops.skiparse_switch(xs, grid, P, mode, dims=dims), ref_switch(xs, grid, P, mode, dims),
                           f"switch {mode} {dims}d")  # fmt: skip
            gl = groups(P, dims) // S
            local = xs[gl * 2 :]
            send = ops.skiparse_exchange_send(local, grid, P, mode, dims=dims, ssp_rank=1, ssp_size=S)
            assert_bitwise(send, ref_exchange_send(local, grid, P, mode, dims, 1, S), f"send {mode} {dims}d")


@pytest.mark.parametrize("dtype,int_view", [(torch.float32, torch.int32), (torch.bfloat16, torch.int16),
                                            (torch.float16, torch.int16)])  # fmt: skip
def test_float_bit_patterns_preserved(device, dtype, int_view):
    """Permutations move bits: random bit patterns (NaN payloads, signalling NaNs, denormals) and inf, -inf,
    -0.0 survive unchanged."""
    grid, P = (1, 3, 5), 2
    info = torch.iinfo(int_view)
    gen = torch.Generator().manual_seed(9)
    bits = torch.randint(info.min, info.max, (2, 15, 4), generator=gen, dtype=torch.int64).to(int_view)
    x = bits.view(dtype).clone()
    x[0, :4, 0] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    x = x.to(device)
    for mode in MODES:
        xs = ops.skiparse_rearrange(x, grid, P, mode)
        assert torch.equal(xs.view(int_view).cpu(), ref_rearrange(x.view(int_view), grid, P, mode)), mode
        assert torch.equal(ops.skiparse_restore(xs, grid, P, mode).view(int_view), x.view(int_view)), mode
        sw = ops.skiparse_switch(xs, grid, P, mode)
        assert torch.equal(sw.view(int_view).cpu(), ref_switch(xs.view(int_view), grid, P, mode)), mode


TRAILING = [(), (1,), (5,), (2, 3), (2, 1, 3), (1, 1)]


@pytest.mark.parametrize("trailing", TRAILING, ids=[str(t) for t in TRAILING])
def test_trailing_dims_any_rank(device, trailing):
    """[B, N] (one element per row), [B, N, C], [B, N, H, D], more dims: the trailing dims move as one row."""
    grid, P = (2, 3, 5), 2
    x = random_tensor((2, 30, *trailing), torch.float32, seed=stable_seed("trail", trailing), device=device)
    for dims in (1, 2):
        for mode in MODES:
            xs = ops.skiparse_rearrange(x, grid, P, mode, dims=dims)
            assert xs.shape == (groups(P, dims) * 2, seq_len(grid, P, dims), *trailing)
            assert_bitwise(xs, ref_rearrange(x, grid, P, mode, dims), f"rearrange {mode}")
            assert_bitwise(ops.skiparse_restore(xs, grid, P, mode, dims=dims), x, f"restore {mode}")
            assert_bitwise(ops.skiparse_switch(xs, grid, P, mode, dims=dims),
                           ops.skiparse_rearrange(x, grid, P, other(mode), dims=dims), f"switch {mode}")  # fmt: skip


def test_empty_batch_and_empty_rows(device):
    """B = 0 and a zero-size trailing dim give empty outputs of the right shapes."""
    grid = (1, 3, 5)
    for shape in [(0, 15, 3), (2, 15, 0)]:
        x = torch.zeros(shape, device=device)
        xs = ops.skiparse_rearrange(x, grid, 2, "group")
        assert xs.shape == (4 * shape[0], 8, shape[2])
        assert ops.skiparse_restore(xs, grid, 2, "group").shape == shape
        assert ops.skiparse_switch(xs, grid, 2, "group").shape == xs.shape


@pytest.mark.parametrize("dims", [1, 2])
def test_non_contiguous_inputs(device, dims):
    """Every op: a strided view gives the same result as the contiguous input (read in place or copied) and as
    the reference; outputs are contiguous."""
    grid, P, B, H, D = (2, 3, 5), 2, 2, 2, 3
    G = groups(P, dims)
    base = random_tensor((B, 30, H, D), torch.float32, seed=21, device=device)
    for mode in MODES:
        for name, view in strided_views(base):
            assert not view.is_contiguous(), name
            dense = base.reshape(view.shape)
            xs = ops.skiparse_rearrange(view, grid, P, mode, dims=dims)
            assert xs.is_contiguous()
            assert_bitwise(xs, ops.skiparse_rearrange(dense, grid, P, mode, dims=dims), f"rearrange {name} {mode}")
            assert_bitwise(xs, ref_rearrange(dense, grid, P, mode, dims), f"rearrange ref {name} {mode}")
        xs = ops.skiparse_rearrange(base, grid, P, mode, dims=dims)
        S, r = (2, 1) if G % 2 == 0 else (1, 0)
        rows = slice(B * G // S * r, None)
        for name, view in strided_views(xs):
            dense = xs.reshape(view.shape)
            restored = ops.skiparse_restore(view, grid, P, mode, dims=dims)
            assert restored.is_contiguous()
            assert_bitwise(restored, ref_restore(dense, grid, P, mode, dims), f"restore {name} {mode}")
            switched = ops.skiparse_switch(view, grid, P, mode, dims=dims)
            assert switched.is_contiguous()
            assert_bitwise(switched, ref_switch(dense, grid, P, mode, dims), f"switch {name} {mode}")
            send = ops.skiparse_exchange_send(view[rows], grid, P, mode, dims=dims, ssp_rank=r, ssp_size=S)
            assert_bitwise(send, ref_exchange_send(dense[rows], grid, P, mode, dims, r, S), f"send {name} {mode}")


def test_exchange_receive_non_contiguous(device):
    """exchange_receive reads a strided received buffer (a slice of a bigger one, or transposed) like the dense one."""
    grid, P, B, S = (2, 3, 5), 2, 2, 2
    x = random_tensor((B, 30, 4), torch.float32, seed=4, device=device)
    for mode in MODES:
        xs = ops.skiparse_rearrange(x, grid, P, mode)
        want = ref_switch(xs, grid, P, mode)
        sends = [ops.skiparse_exchange_send(xs[r * 2 * B : (r + 1) * 2 * B], grid, P, mode, ssp_rank=r, ssp_size=S)
                 for r in range(S)]  # fmt: skip
        for r, recv in enumerate(simulate_all_to_all(sends)):
            big = torch.zeros(S + 1, recv.shape[1] + 5, 2, 4, device=device)
            big[1:, 3 : 3 + recv.shape[1], 1] = recv
            transposed = recv.transpose(0, 1).contiguous().transpose(0, 1)
            for view in (big[1:, 3 : 3 + recv.shape[1], 1], transposed):
                got = ops.skiparse_exchange_receive(view, grid, P, mode, ssp_rank=r, ssp_size=S)
                assert_bitwise(got, want[r * 2 * B : (r + 1) * 2 * B], f"receive {mode} r={r}")


# ---- autograd through the wrappers -------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("grid,P,S", [((2, 3, 5), 2, 1), ((2, 3, 5), 2, 2), ((1, 4, 10), 3, 1)])
def test_autograd_is_the_inverse_map(device, grid, P, S, dims):
    """d rearrange = restore of the cotangent, d restore = rearrange, d switch = switch from the other mode (all
    against the reference maps; SSP rank 1 when S = 2)."""
    assert groups(P, dims) % S == 0
    B, r = 2, S - 1
    x = random_tensor((B, n_tokens(grid), 3), torch.float32, seed=8, device=device).requires_grad_()
    for mode in MODES:
        kw = dict(dims=dims, ssp_rank=r, ssp_size=S)
        xs = ops.skiparse_rearrange(x, grid, P, mode, **kw)
        g = random_tensor(xs.shape, torch.float32, seed=12, device=device)
        (dx,) = torch.autograd.grad(xs, x, g)
        assert_bitwise(dx, ref_restore(g, grid, P, mode, dims, r, S), f"d rearrange {mode}")
        ys = xs.detach().requires_grad_()
        out = ops.skiparse_restore(ys, grid, P, mode, **kw)
        gx = random_tensor(out.shape, torch.float32, seed=13, device=device)
        (dys,) = torch.autograd.grad(out, ys, gx)
        assert_bitwise(dys, ref_rearrange(gx, grid, P, mode, dims, r, S), f"d restore {mode}")
        if S == 1:
            sw = ops.skiparse_switch(ys, grid, P, mode, dims=dims)
            gs = random_tensor(sw.shape, torch.float32, seed=14, device=device)
            (dsw,) = torch.autograd.grad(sw, ys, gs)
            assert_bitwise(dsw, ref_switch(gs, grid, P, other(mode), dims), f"d switch {mode}")
