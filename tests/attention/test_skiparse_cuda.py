"""CUDA Skiparse kernels (cuda/attention/skiparse.cu) against the CPU kernels and the references of skiparse_testlib.
Everything here is marked ``cuda``: skipped without a GPU, selected by ``pytest -m cuda``.

* Every permutation op (rearrange, restore, switch, exchange_send, exchange_receive through a simulated all_to_all),
  CUDA == CPU bitwise, for float32 / bfloat16 / float16 and 1-byte dtypes, on padded grids, grids with empty
  sub-sequences, P = 3 and dims = 1, with row sizes that select every vector width of the gather (16, 8, 4, 2 and
  1 bytes: e.g. C = 3 in fp16 is a 6-byte row), rows longer than a warp's worth of vectors, and non-contiguous
  inputs (strided outer dims, misaligned row starts read in place, non-dense trailing dims copied).
* skiparse_attention on CUDA vs the fp64 masked oracle (accuracy criterion in bf16 / fp16 / fp32), forward and
  backward, and P = 1 bitwise equal to CUDA flash_attention.
"""

from __future__ import annotations

import pytest
import torch

from skiparse_testlib import (
    DTYPE_IDS,
    MODES,
    assert_bitwise,
    check_attention,
    divisors,
    groups,
    random_tensor,
    ref_rearrange,
    ref_switch,
    run_with_grads,
    seq_len,
    simulate_all_to_all,
    stable_seed,
    strided_views,
)

pytestmark = pytest.mark.cuda
difforge = pytest.importorskip("difforge")
ops = difforge.ops

# (grid, P, dims)
LAYOUTS = {
    "3x5-P2-padded": ((1, 3, 5), 2, 2),
    "1x6-P2-empty": ((2, 1, 6), 2, 2),
    "17x30-P2-padded": ((3, 17, 30), 2, 2),
    "4x10-P3": ((2, 4, 10), 3, 2),
    "1d-N105-P3": ((3, 5, 7), 3, 1),
    "1d-N64-P2": ((2, 4, 8), 2, 1),
}
# (dtype, row shape): row bytes 12 / 16 (fp32), 10 / 640 / 2560 (bf16), 6 / 8 / 2 (fp16), 3 / 1 / 1031 (1-byte
# types). 2560 bytes = 160 16-byte vectors and 1031 1-byte ones: several rounds of the kernel's unrolled lane loop
# (32 lanes x 4) plus a partial one.
ROWS = [
    (torch.float32, (3,)),
    (torch.float32, (2, 2)),
    (torch.bfloat16, (5,)),
    (torch.bfloat16, (2, 160)),
    (torch.bfloat16, (8, 160)),
    (torch.float16, (3,)),
    (torch.float16, (4,)),
    (torch.float16, ()),
    (torch.uint8, (3,)),
    (torch.bool, ()),
    (torch.uint8, (1031,)),
]
ROW_IDS = [f"{DTYPE_IDS[d]}-{'x'.join(map(str, r)) or 'scalar'}" for d, r in ROWS]


def _check_all_ops(x_cpu, grid, P, dims, what, x_cuda=None):
    """Every op on CUDA == on the CPU, bitwise; rearrange also == the reference map."""
    x_cuda = x_cpu.cuda() if x_cuda is None else x_cuda
    B = x_cpu.shape[0]
    G = groups(P, dims)
    for mode in MODES:
        xs_cpu = ops.skiparse_rearrange(x_cpu, grid, P, mode, dims=dims)
        xs_cuda = ops.skiparse_rearrange(x_cuda, grid, P, mode, dims=dims)
        assert xs_cuda.is_cuda and xs_cuda.is_contiguous()
        assert_bitwise(xs_cuda, xs_cpu, f"rearrange {mode} {what}")
        assert_bitwise(xs_cuda, ref_rearrange(x_cpu, grid, P, mode, dims), f"rearrange ref {mode} {what}")
        # an arbitrary tensor in the sparse layout: garbage in the padded slots must not leak
        ys_cpu = random_tensor(xs_cpu.shape, x_cpu.dtype, seed=stable_seed(what, mode))
        ys_cuda = ys_cpu.cuda()
        assert_bitwise(ops.skiparse_restore(ys_cuda, grid, P, mode, dims=dims),
                       ops.skiparse_restore(ys_cpu, grid, P, mode, dims=dims), f"restore {mode} {what}")  # fmt: skip
        switched = ops.skiparse_switch(ys_cuda, grid, P, mode, dims=dims)
        assert_bitwise(switched, ops.skiparse_switch(ys_cpu, grid, P, mode, dims=dims), f"switch {mode} {what}")
        assert_bitwise(switched, ref_switch(ys_cpu, grid, P, mode, dims), f"switch ref {mode} {what}")
        for S in divisors(G):
            gl = G // S
            kws = [dict(dims=dims, ssp_rank=r, ssp_size=S) for r in range(S)]
            loc_cpu = [xs_cpu[r * gl * B : (r + 1) * gl * B] for r in range(S)]
            loc_cuda = [xs_cuda[r * gl * B : (r + 1) * gl * B] for r in range(S)]
            for r in range(S):
                assert_bitwise(ops.skiparse_rearrange(x_cuda, grid, P, mode, **kws[r]), loc_cpu[r],
                               f"rearrange {mode} S={S} r={r} {what}")  # fmt: skip
                assert_bitwise(ops.skiparse_restore(loc_cuda[r], grid, P, mode, **kws[r]),
                               ops.skiparse_restore(loc_cpu[r], grid, P, mode, **kws[r]),
                               f"restore {mode} S={S} r={r} {what}")  # fmt: skip
            sends_cpu = [ops.skiparse_exchange_send(t, grid, P, mode, **kw) for t, kw in zip(loc_cpu, kws)]
            sends_cuda = [ops.skiparse_exchange_send(t, grid, P, mode, **kw) for t, kw in zip(loc_cuda, kws)]
            for r in range(S):
                assert_bitwise(sends_cuda[r], sends_cpu[r], f"send {mode} S={S} r={r} {what}")
            want = ref_switch(xs_cpu, grid, P, mode, dims)
            for r, recv in enumerate(simulate_all_to_all(sends_cuda)):
                got = ops.skiparse_exchange_receive(recv, grid, P, mode, **kws[r])
                assert got.is_cuda
                assert_bitwise(got, want[r * gl * B : (r + 1) * gl * B], f"exchange {mode} S={S} r={r} {what}")


@pytest.mark.parametrize("dtype,row", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_ops_match_cpu(layout, dtype, row):
    grid, P, dims = LAYOUTS[layout]
    if layout == "17x30-P2-padded" and row not in ((2, 160), (3,)):
        pytest.skip("the large grid runs with two row sizes only")
    x = random_tensor((2, grid[0] * grid[1] * grid[2], *row), dtype, seed=stable_seed(layout, dtype, row))
    _check_all_ops(x, grid, P, dims, f"{layout} {DTYPE_IDS[dtype]} {row}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("D", [3, 8])
def test_cuda_non_contiguous_inputs(dtype, D):
    """Strided / misaligned / non-dense views on the GPU == the contiguous CPU input (D = 3: odd row bytes)."""
    grid, P, B, H = (2, 3, 5), 2, 2, 2
    base = random_tensor((B, 30, H, D), dtype, seed=stable_seed("nc", dtype, D))
    for name, view in strided_views(base.cuda()):
        assert not view.is_contiguous(), name
        dense = base.reshape(view.shape)
        for dims in (1, 2):
            _check_all_ops(dense, grid, P, dims, f"{name} {dims}d", x_cuda=view)
    # the sparse-layout ops reading strided views on the GPU
    for mode in MODES:
        xs = ops.skiparse_rearrange(base, grid, P, mode)
        for name, view in strided_views(xs.cuda()):
            dense = xs.reshape(view.shape)
            assert_bitwise(ops.skiparse_restore(view, grid, P, mode), ops.skiparse_restore(dense, grid, P, mode),
                           f"restore {name} {mode}")  # fmt: skip
            assert_bitwise(ops.skiparse_switch(view, grid, P, mode), ops.skiparse_switch(dense, grid, P, mode),
                           f"switch {name} {mode}")  # fmt: skip
            local = slice(2 * B, None)
            assert_bitwise(ops.skiparse_exchange_send(view[local], grid, P, mode, ssp_rank=1, ssp_size=2),
                           ops.skiparse_exchange_send(dense[local], grid, P, mode, ssp_rank=1, ssp_size=2),
                           f"send {name} {mode}")  # fmt: skip


def test_cuda_autograd_matches_cpu():
    """Backward of rearrange / restore / switch on the GPU == on the CPU (bitwise: they are permutations)."""
    grid, P = (1, 5, 7), 2
    x = random_tensor((2, 35, 6), torch.bfloat16, seed=3)
    for mode in MODES:
        results = []
        for dev in ("cpu", "cuda"):
            leaf = x.to(dev).requires_grad_()
            xs = ops.skiparse_rearrange(leaf, grid, P, mode, ssp_rank=1, ssp_size=2)
            sw = ops.skiparse_switch(ops.skiparse_rearrange(leaf, grid, P, mode), grid, P, mode)
            out = ops.skiparse_restore(sw, grid, P, "group" if mode == "token" else "token")
            g1 = random_tensor(xs.shape, torch.bfloat16, seed=4, device=dev)
            g2 = random_tensor(out.shape, torch.bfloat16, seed=5, device=dev)
            results.append(torch.autograd.grad([xs, out], leaf, [g1, g2])[0])
        assert_bitwise(results[1], results[0], f"grad {mode}")


# ---- attention ---------------------------------------------------------------------------------------------------

ATTN = {
    "9x14-P2-padded": ((2, 9, 14), 2, 2),
    "2x9-P3-empty": ((2, 2, 9), 3, 2),
    "16x16-P2": ((1, 16, 16), 2, 2),
    "1d-N210-P3": ((2, 7, 15), 3, 1),
}


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(ATTN))
def test_cuda_attention_matches_oracle(case, mode, dtype, D):
    grid, P, dims = ATTN[case]
    N = grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(stable_seed("cuda_attn", case, mode, D))
    q, k, v = (torch.randn(2, N, 2, D, generator=gen) * g for g in (1.5, 1.0, 1.0))
    q, k, v = (t.to(dtype).cuda() for t in (q, k, v))
    layout = dict(grid=grid, sparse_ratio=P, mode=mode, dims=dims)
    check_attention(lambda a, b, c: ops.skiparse_attention(a, b, c, **layout), q, k, v, grid=grid, P=P, mode=mode,
                    dims=dims)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_attention_p1_is_flash_attention(dtype):
    grid = (2, 5, 6)
    q, k, v = (random_tensor((2, 60, 2, 64), dtype, seed=s, device="cuda") for s in (1, 2, 3))
    dout = random_tensor(q.shape, dtype, seed=4, device="cuda")
    want, want_grads = run_with_grads(lambda a, b, c: ops.flash_attention(a, b, c)[0], q, k, v, dout)
    for mode in MODES:
        layout = dict(grid=grid, sparse_ratio=1, mode=mode)
        got, got_grads = run_with_grads(lambda a, b, c: ops.skiparse_attention(a, b, c, **layout), q, k, v, dout)
        assert_bitwise(got, want, f"out {mode}")
        for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
            assert_bitwise(g, w, f"{name} {mode}")


def test_cuda_seqlens_device():
    counts = ops.skiparse_seqlens((21, 45, 80), 2, "group", batch=2, device="cuda")
    assert counts.is_cuda and counts.dtype == torch.int32
    assert counts.tolist() == [19320, 19320, 19320, 19320, 18480, 18480, 18480, 18480]
    assert seq_len((21, 45, 80), 2) == 20160
