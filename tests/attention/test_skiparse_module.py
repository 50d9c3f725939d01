"""difforge.nn Skiparse layer: the dual_end schedule, SkiparseLayout (activation kept in the sparse layout across
blocks), SkiparseAttention against a plain-PyTorch block with the spec's dense masks, and 3D RoPE from
original positions (commutes with the permutation, bitwise)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from difforge import ops
from difforge.nn import SkiparseAttention, SkiparseLayout, apply_rope, dual_end_schedule, rope_angles_3d, rope_split
from difforge.nn import skiparse as skiparse_module

# ---- plain-PyTorch references (written here, independent of the ops) ----


def grid_coords(grid):
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return t.flatten(), h.flatten(), w.flatten()


def skiparse_mask(grid, P, kind):
    """Spec §3.1 dense-mask oracle over original tokens; "full" is all-True."""
    _, h, w = grid_coords(grid)
    if kind == "full":
        return torch.ones(h.numel(), h.numel(), dtype=torch.bool)
    dh, dw = (h % P, w % P) if kind == "token" else ((h // P) % P, (w // P) % P)
    return (dh[:, None] == dh[None]) & (dw[:, None] == dw[None])


def reference_rope(x, grid, theta=10000.0):
    """Complex-multiplication RoPE with (t, h, w) pairs split as floor(D/6) for h and w."""
    D = x.shape[-1]
    n_h = n_w = D // 6
    n_t = D // 2 - n_h - n_w
    t, h, w = grid_coords(grid)
    angles = []
    for pos, n in ((t, n_t), (h, n_h), (w, n_w)):
        freqs = theta ** (-torch.arange(n, dtype=torch.float64) / max(n, 1))
        angles.append(pos.double()[:, None] * freqs[None])
    angle = torch.cat(angles, dim=1)[None, :, None]  # [1, N, 1, D/2]
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).flatten(-2).to(x.dtype)


def reference_block(module, x, grid, P, kind, rope=True):
    B, N, C = x.shape
    H, D = module.num_heads, module.head_dim
    q, k, v = module.qkv(x).unflatten(-1, (3, H, D)).unbind(-3)
    q, k = module.q_norm(q), module.k_norm(k)
    if rope:
        q, k = reference_rope(q, grid), reference_rope(k, grid)
    mask = skiparse_mask(grid, P, kind)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return module.proj(out.transpose(1, 2).flatten(-2))


# ---- schedule ----


def test_dual_end_schedule_matches_wan14b():
    letters = "".join(kind[0].upper() for kind in dual_end_schedule(40, 8))
    assert letters == "FFFF" + "TG" * 16 + "FFFF"


def test_dual_end_schedule_odd_sparse_count_ends_on_token():
    assert dual_end_schedule(7, 4) == ["full", "full", "token", "group", "token", "full", "full"]
    assert dual_end_schedule(4, 0) == ["token", "group", "token", "group"]
    assert dual_end_schedule(4, 4) == ["full"] * 4


@pytest.mark.parametrize(("layers", "full"), [(8, 2), (8, 6), (4, 8), (8, -4), (0, 0)])
def test_dual_end_schedule_rejects_bad_counts(layers, full):
    with pytest.raises(ValueError, match="dual_end_schedule"):
        dual_end_schedule(layers, full)


# ---- RoPE ----


def test_rope_split_follows_the_spec():
    assert rope_split(128) == (22, 21, 21)
    assert rope_split(64) == (12, 10, 10)
    with pytest.raises(ValueError, match="even"):
        rope_split(7)


def test_rope_matches_complex_reference():
    grid = (3, 4, 5)
    x = torch.randn(2, 60, 3, 24, dtype=torch.float64)
    ours = apply_rope(x, rope_angles_3d(grid, 24, dtype=torch.float64)[None, :, None])
    torch.testing.assert_close(ours, reference_rope(x, grid), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["token", "group"])
def test_rope_commutes_with_the_permutation_bitwise(mode):
    grid, P, B = (2, 5, 6), 2, 2
    x = torch.randn(B, 60, 3, 16)
    angles = rope_angles_3d(grid, 16)
    layout = SkiparseLayout(grid, P, batch=B)
    xs = layout.to(x, mode)
    rotated_then_permuted = ops.skiparse_rearrange(apply_rope(x, angles[None, :, None]), grid, P, mode)
    assert torch.equal(apply_rope(xs, layout.arrange_angles(angles)), rotated_then_permuted)


# ---- SkiparseAttention ----


def make_module(C=32, heads=4, seed=0):
    torch.manual_seed(seed)
    return SkiparseAttention(C, heads).double()


def test_sparse_ratio_one_is_dense_attention_bitwise():
    grid, B = (2, 3, 4), 2
    module = make_module()
    x = torch.randn(B, 24, 32, dtype=torch.float64)
    angles = rope_angles_3d(grid, 8)
    dense = module(x, SkiparseLayout(grid, 2, batch=B), angles)
    for mode in ("token", "group"):
        layout = SkiparseLayout(grid, 1, batch=B)
        assert torch.equal(layout.to(module(layout.to(x, mode), layout, angles), "full"), dense)


@pytest.mark.parametrize("grid", [(2, 4, 4), (1, 5, 7), (2, 1, 6)])
@pytest.mark.parametrize("mode", ["token", "group"])
def test_block_equals_dense_attention_under_the_mask(grid, mode):
    B, N = 2, math.prod(grid)
    module = make_module()
    x = torch.randn(B, N, 32, dtype=torch.float64, requires_grad=True)
    layout = SkiparseLayout(grid, 2, batch=B)
    ours = layout.to(module(layout.to(x, mode), layout, rope_angles_3d(grid, 8, dtype=torch.float64)), "full")
    ref = reference_block(module, x, grid, 2, mode)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ours)
    (grad_ours,) = torch.autograd.grad(ours, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-9, atol=1e-9)


def test_hybrid_stack_keeps_the_sparse_layout_and_matches_the_reference(monkeypatch):
    """dual_end over 8 layers (F=4): F F T G T G F F; one rearrange, three switches, one restore."""
    grid, P, B, C = (2, 5, 6), 2, 2, 32
    schedule = dual_end_schedule(8, 4)
    blocks = [make_module(seed=i) for i in range(len(schedule))]
    calls = {"skiparse_rearrange": 0, "skiparse_switch": 0, "skiparse_restore": 0}
    for name in calls:
        original = getattr(skiparse_module.skiparse_ops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(skiparse_module.skiparse_ops, name, counted)

    x0 = torch.randn(B, math.prod(grid), C, dtype=torch.float64)
    angles = rope_angles_3d(grid, C // 4, dtype=torch.float64)
    layout, x = SkiparseLayout(grid, P, batch=B), x0
    for kind, block in zip(schedule, blocks):
        x = layout.to(x, kind)
        x = x + block(x, layout, angles)
    ours = layout.to(x, "full")
    # angles are rearranged once per sparse kind (cached), activations once at entry
    assert calls == {"skiparse_rearrange": 1 + 2, "skiparse_switch": 3, "skiparse_restore": 1}

    ref = x0
    for kind, block in zip(schedule, blocks):
        ref = ref + reference_block(block, ref, grid, P, kind)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_padded_rows_stay_out_of_valid_tokens():
    """Padded slots carry junk after a block, but no valid token reads them: changing them changes nothing."""
    grid, P, B = (1, 3, 5), 2, 1
    module = make_module()
    layout = SkiparseLayout(grid, P, batch=B)
    xs = layout.to(torch.randn(B, 15, 32, dtype=torch.float64), "token")
    noisy = xs.clone()
    seqlens = layout.seqlens(xs.device).long()
    for row, valid in enumerate(seqlens.tolist()):
        noisy[row, valid:] = 1e3
    out, out_noisy = module(xs, layout), module(noisy, layout)
    restored = ops.skiparse_restore(out, grid, P, "token")
    assert torch.equal(restored, ops.skiparse_restore(out_noisy, grid, P, "token"))


def test_layout_batch_repeat_and_seqlens():
    layout = SkiparseLayout((2, 3, 5), 2, batch=3)
    assert layout.batch_repeat == 1 and layout.seqlens(torch.device("cpu")) is None
    layout.to(torch.zeros(3, 30, 4), "group")
    assert layout.batch_repeat == 4
    assert layout.seqlens(torch.device("cpu")).tolist() == [12] * 3 + [8] * 3 + [6] * 3 + [4] * 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": (2, 3), "sparse_ratio": 2}, "grid"),
        ({"grid": (0, 3, 3), "sparse_ratio": 2}, "grid"),
        ({"grid": (1, 3, 3), "sparse_ratio": 0}, "sparse_ratio"),
        ({"grid": (1, 3, 3), "sparse_ratio": 2, "dims": 3}, "dims"),
    ],
)
def test_layout_rejects_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SkiparseLayout(batch=1, **kwargs)


def test_layout_rejects_unknown_kind_and_attention_bad_heads():
    layout = SkiparseLayout((1, 2, 2), 2, batch=1)
    with pytest.raises(ValueError, match="kind"):
        layout.to(torch.zeros(1, 4, 2), "dense")
    with pytest.raises(ValueError, match="num_heads"):
        SkiparseAttention(30, 4)
