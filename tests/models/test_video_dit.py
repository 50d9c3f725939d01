"""difforge.models.VideoDiT against a plain-PyTorch float64 reference written here (Wan2.1's block math on the
model's own parameters, Skiparse blocks as dense attention under the spec's masks), plus layouts, options and
bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from difforge.models import CONFIGS, VideoDiT, VideoDiTConfig, video_dit_config
from difforge.nn import HiF8Linear, quantize_linears

SMALL = dict(dim=32, depth=4, num_heads=2, ffn_dim=64, context_dim=16, freq_dim=32, full_blocks=0)

# ---- the reference ----


def ref_patchify(latents, patch):
    """Token n = (t, h, w) row-major holds the patch's values ordered (dt, dh, dw, c)."""
    B, C, T, H, W = latents.shape
    pt, ph, pw = patch
    tokens = []
    for t in range(T // pt):
        for h in range(H // ph):
            for w in range(W // pw):
                cube = latents[:, :, t * pt : (t + 1) * pt, h * ph : (h + 1) * ph, w * pw : (w + 1) * pw]
                tokens.append(cube.permute(0, 2, 3, 4, 1).reshape(B, -1))
    return torch.stack(tokens, dim=1)


def ref_rope(x, grid, theta=10000.0):
    """Wan-style 3D RoPE: pairs split (t, h, w) = (d/2 - 2*(d//6), d//6, d//6), frequencies per axis."""
    T, H, W = grid
    half = x.shape[-1] // 2
    hw = x.shape[-1] // 6
    split = (half - 2 * hw, hw, hw)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    angles = []
    for pos, n in zip((t, h, w), split):
        freqs = theta ** (-torch.arange(n, dtype=torch.float64) / n)
        angles.append(pos.reshape(-1, 1).double() * freqs)
    a = torch.cat(angles, dim=1)[None, :, None]  # [1, N, 1, half]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack((even * a.cos() - odd * a.sin(), even * a.sin() + odd * a.cos()), dim=-1)
    return out.flatten(-2)


def ref_skiparse_mask(grid, P, mode, dims):
    """Skiparse's key sets on original tokens (OSP-Next): token mode groups tokens by (h mod P, w mod P), group
    mode by (floor(h/P) mod P, floor(w/P) mod P); 1D uses the flat index in place of w and ignores h."""
    T, H, W = grid
    i = torch.arange(T * H * W)
    h, w = ((i // W) % H, i % W) if dims == 2 else (torch.zeros_like(i), i)
    digit = (lambda a: a % P) if mode == "token" else (lambda a: (a // P) % P)
    key = digit(h) * P + digit(w)
    return key[:, None] == key[None, :]


def ref_rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def ref_attention(q, k, v, mask=None):
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v)


def linear(x, layer):
    return F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())


def ref_forward(model: VideoDiT, latents, t, context):
    """Wan2.1's forward on the model's parameters in float64; t [B] or [B, F]."""
    c = model.config
    B, _, T, H, W = latents.shape
    grid = (T // c.patch[0], H // c.patch[1], W // c.patch[2])
    N, heads, hd = math.prod(grid), c.num_heads, c.head_dim
    x = linear(ref_patchify(latents.double(), c.patch), model.patch_embedding)
    t = t[:, None] if t.dim() == 1 else t
    half = c.freq_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = (t.double() * 1000)[..., None] * freqs
    sinus = torch.cat((ang.cos(), ang.sin()), dim=-1)  # [B, F, freq]
    te = model.time_embedding
    e = linear(F.silu(linear(sinus, te[0])), te[2])  # [B, F, dim]
    e6 = linear(F.silu(e), model.time_projection[1]).unflatten(-1, (6, c.dim))  # [B, F, 6, dim]
    tokens_per_frame = N // e.shape[1]
    e6 = e6.repeat_interleave(tokens_per_frame, dim=1)  # per token [B, N, 6, dim]
    ctx = linear(F.gelu(linear(context.double(), model.text_embedding[0]), approximate="tanh"),
                 model.text_embedding[2])  # fmt: skip
    ln = lambda v: F.layer_norm(v, v.shape[-1:], eps=c.eps)  # noqa: E731
    for kind, block in zip(c.schedule(), model.blocks):
        m = block.modulation.double() + e6
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(2)
        y = ln(x) * (1 + scale1) + shift1
        sa = block.self_attn
        q, k, v = linear(y, sa.qkv).unflatten(-1, (3, heads, hd)).unbind(-3)
        q, k = ref_rms(q, sa.q_norm.weight.double()), ref_rms(k, sa.k_norm.weight.double())
        q, k = ref_rope(q, grid), ref_rope(k, grid)
        mask = None if kind == "full" else ref_skiparse_mask(grid, c.sparse_ratio, kind, c.sparse_dims)
        x = x + gate1 * linear(ref_attention(q, k, v, mask).flatten(-2), sa.proj)
        n3 = block.norm3
        y = F.layer_norm(x, x.shape[-1:], n3.weight.double(), n3.bias.double(), c.eps)
        ca = block.cross_attn
        q = ref_rms(linear(y, ca.q).unflatten(-1, (heads, hd)), ca.q_norm.weight.double())
        kc, vc = linear(ctx, ca.kv).unflatten(-1, (2, heads, hd)).unbind(-3)
        kc = ref_rms(kc, ca.k_norm.weight.double())
        x = x + linear(ref_attention(q, kc, vc).flatten(-2), ca.o)
        y = ln(x) * (1 + scale2) + shift2
        x = x + gate2 * linear(F.gelu(linear(y, block.ffn[0]), approximate="tanh"), block.ffn[2])
    head = model.head_modulation.double() + e.repeat_interleave(tokens_per_frame, dim=1)[:, :, None]
    shift, scale = head.unbind(2)
    return linear(ln(x) * (1 + scale) + shift, model.head)  # tokens [B, N, patch_volume * C]


def make_model(seed=0, **overrides) -> VideoDiT:
    torch.manual_seed(seed)
    model = VideoDiT(video_dit_config("tiny", **{**SMALL, **overrides}))
    with torch.no_grad():  # a zero head would hide everything before it
        model.head.weight.normal_(0, 0.2)
        model.head.bias.normal_(0, 0.2)
    return model


def inputs(model, B, T, H, W, seed=1, per_frame=False):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    latents = torch.randn(B, c.in_channels, T, H, W, generator=g)
    frames = T // c.patch[0]
    t = torch.rand((B, frames) if per_frame else (B,), generator=g)
    context = torch.randn(B, 5, c.context_dim, generator=g)
    return latents, t, context


def assert_close(got, want, tol, what):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{what}: max |diff| {err:.3e} (scale {scale:.3e}, tol {tol})"


# ---- tests ----


def test_patchify_matches_reference_and_unpatchify_inverts():
    model = make_model(patch=(2, 2, 1))
    latents = torch.randn(2, 4, 4, 6, 3)
    tokens = model.patchify(latents)
    assert torch.equal(tokens, ref_patchify(latents, (2, 2, 1)))
    assert torch.equal(model.unpatchify(tokens, model.grid(latents.shape)), latents)


@pytest.mark.parametrize("per_frame", [False, True], ids=["per_sample_t", "per_frame_t"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(attention="hybrid", full_blocks=0, sparse_ratio=2),  # T G T G
        dict(attention="hybrid", full_blocks=4, depth=6, sparse_ratio=2),  # F F T G F F
        dict(attention="hybrid", full_blocks=0, sparse_ratio=3, sparse_dims=1),
        dict(fused_norm=False, backend="sdpa", attention="hybrid", full_blocks=0),
    ],
    ids=["full", "hybrid_TGTG", "hybrid_dual_end", "hybrid_1d_P3", "plain_pytorch_hybrid"],
)
def test_forward_matches_reference(overrides, per_frame):
    model = make_model(**overrides)
    latents, t, context = inputs(model, 2, 3, 10, 6, per_frame=per_frame)  # grid 3 x 5 x 3: Skiparse pads
    with torch.no_grad():
        got = model.forward_tokens(latents, t, context)
    assert_close(got, ref_forward(model, latents, t, context), 2e-5, "tokens")
    video = model(latents, t, context)
    assert video.shape == latents.shape


def test_backward_matches_reference():
    model = make_model(attention="hybrid", full_blocks=0)
    latents, t, context = inputs(model, 2, 2, 8, 8, per_frame=True)
    weight = torch.randn(2, 32, 16, dtype=torch.float64)  # [B, N, patch volume * C]
    (model.forward_tokens(latents, t, context).double() * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_model = make_model(attention="hybrid", full_blocks=0)
    ref_model.load_state_dict(model.state_dict())
    (ref_forward(ref_model, latents, t, context) * weight).sum().backward()
    for name, p in ref_model.named_parameters():
        assert grads[name].abs().sum() > 0, f"{name}: no gradient"
        assert_close(grads[name], p.grad.double(), 1e-4, f"grad {name}")


def test_per_frame_time_with_equal_frames_equals_per_sample_time():
    model = make_model(attention="hybrid", full_blocks=0)
    latents, t, context = inputs(model, 2, 3, 8, 8)
    with torch.no_grad():
        a = model(latents, t, context)
        b = model(latents, t[:, None].expand(2, 3).contiguous(), context)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@given(
    T=st.integers(1, 3), H=st.integers(1, 5), W=st.integers(1, 5), B=st.integers(1, 2), P=st.integers(2, 3),
    mode=st.sampled_from(["full", "hybrid"]), per_frame=st.booleans(),
)  # fmt: skip
def test_hypothesis_shapes(T, H, W, B, P, mode, per_frame):
    model = make_model(patch=(1, 2, 2), attention=mode, sparse_ratio=P, depth=2, full_blocks=0)
    latents, t, context = inputs(model, B, T, 2 * H, 2 * W, per_frame=per_frame)
    with torch.no_grad():
        got = model.forward_tokens(latents, t, context)
    assert_close(got, ref_forward(model, latents, t, context), 2e-5, "tokens")


def test_hif8_linears_convert_blocks_and_stay_close():
    model = make_model(dim=64, num_heads=4, ffn_dim=128)
    latents, t, context = inputs(model, 1, 2, 8, 8)
    with torch.no_grad():
        ref = model(latents, t, context)
    quantize_linears(model, "hif8")
    converted = {n for n, m in model.named_modules() if isinstance(m, HiF8Linear)}
    assert "blocks.0.self_attn.qkv" in converted and "blocks.0.ffn.0" in converted
    assert not any(k in n for n in converted for k in ("embedding", "head", "time_projection"))
    with torch.no_grad():
        got = model(latents, t, context)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel


def test_named_configs():
    assert set(CONFIGS) >= {"tiny", "mid", "wan-1.3b"}
    wan = video_dit_config("wan-1.3b")
    assert (wan.dim, wan.depth, wan.num_heads, wan.ffn_dim, wan.in_channels) == (1536, 30, 12, 8960, 16)
    tiny = VideoDiT("tiny")
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    cfg = video_dit_config("tiny", attention="hybrid")
    assert VideoDiTConfig.from_dict(cfg.to_dict()) == cfg
    assert "".join(k[0] for k in cfg.schedule()) == "fftgff"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_heads=3), "num_heads"),
        (dict(attention="hybrid", sparse_ratio=1), "sparse_ratio"),
        (dict(attention="hybrid", full_blocks=2), "multiple of 4"),
        (dict(attention="sparse"), "attention"),
        (dict(patch=(1, 0, 2)), "patch"),
        (dict(backend="triton"), "backend"),
        (dict(depth=0), "depth"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        video_dit_config("tiny", **overrides)


def test_unknown_config_and_fields():
    with pytest.raises(ValueError, match="unknown VideoDiT config 'huge'"):
        video_dit_config("huge")
    with pytest.raises(ValueError, match="unknown fields"):
        VideoDiTConfig.from_dict({**video_dit_config("tiny").to_dict(), "dims": 3})


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, t, c: (x[:, :3], t, c), "latents must be"),
        (lambda x, t, c: (x[..., :7], t, c), "multiples of the patch"),
        (lambda x, t, c: (x, t[:1], c), "t must be"),
        (lambda x, t, c: (x, t.long(), c), "float tensor"),
        (lambda x, t, c: (x, t, c[..., :3]), "context must be"),
    ],
)
def test_bad_inputs(change, match):
    model = make_model()
    with pytest.raises((ValueError, TypeError), match=match):
        model(*change(*inputs(model, 2, 2, 8, 8)))


def test_options_share_weights_and_agree():
    base = make_model(attention="hybrid", full_blocks=0)
    latents, t, context = inputs(base, 2, 2, 6, 10, per_frame=True)
    with torch.no_grad():
        want = base(latents, t, context)
        for change in (dict(fused_norm=False), dict(backend="sdpa")):
            other = VideoDiT(dataclasses.replace(base.config, **change))
            other.load_state_dict(base.state_dict())
            torch.testing.assert_close(other(latents, t, context), want, rtol=1e-5, atol=1e-5)
