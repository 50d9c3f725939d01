"""DiscreteTransformer: a plain-PyTorch reference forward written here (norms, attention, 2D rotary positions,
adaLN modulation), the SUBS carry-over of the masked variant, normalisation, batch independence, gradients, the
eager-norm / SDPA baselines, config round trip and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from difforge.models import DiscreteTransformer, DiscreteTransformerConfig

PROCESSES = ("masked", "uniform")
TINY = dict(vocab_size=5, length=12, grid=(3, 4), dim=32, depth=2, heads=2, ffn=48, freq_dim=16)


def _randomized(config: DiscreteTransformerConfig, seed: int = 0) -> DiscreteTransformer:
    """A model whose zero-initialised parts (gates, head) are random too, so every path shows in the output."""
    torch.manual_seed(seed)
    model = DiscreteTransformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    return model


def _inputs(config: DiscreteTransformerConfig, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(config.input_vocab, (batch, config.length), generator=g)
    return x, torch.rand(batch, generator=g, dtype=torch.float64)


# ---- reference ---------------------------------------------------------------------------------------------


def reference_angles(config: DiscreteTransformerConfig) -> torch.Tensor:
    """Documented 2D rotary layout: pairs [0, n_r) turn with the row, [n_r, P) with the column, frequency
    theta^(-i/n) within each axis' n pairs."""
    pairs = config.head_dim // 2
    n_r = pairs // 2
    H, W = config.grid
    angles = torch.zeros(config.length, pairs, dtype=torch.float64)
    for pos in range(config.length):
        r, c = divmod(pos, W)
        for i in range(pairs):
            if i < n_r:
                angles[pos, i] = r * config.rope_theta ** (-i / n_r)
            else:
                angles[pos, i] = c * config.rope_theta ** (-(i - n_r) / (pairs - n_r))
    return angles


def reference_forward(model: DiscreteTransformer, x_t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The documented architecture in float64 with plain ops."""
    c = model.config
    p = {name: t.double() for name, t in model.state_dict().items()}
    half = c.freq_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    feats = torch.cat([torch.cos(alpha[:, None] * 1000 * freqs), torch.sin(alpha[:, None] * 1000 * freqs)], -1)
    cond = F.linear(feats, p["time_embedding.0.weight"], p["time_embedding.0.bias"])
    cond = F.silu(F.linear(F.silu(cond), p["time_embedding.2.weight"], p["time_embedding.2.bias"]))

    def modulated(h, shift, scale):
        return F.layer_norm(h, h.shape[-1:], eps=c.eps) * (1 + scale[:, None]) + shift[:, None]

    angles = reference_angles(c)
    cos, sin = angles.cos(), angles.sin()

    def rotate(v):  # v [B, L, H, hd]: pair (2i, 2i+1) rotated by angle i
        even, odd = v[..., 0::2], v[..., 1::2]
        cs, sn = cos[None, :, None], sin[None, :, None]
        return torch.stack([even * cs - odd * sn, even * sn + odd * cs], -1).flatten(-2)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    h = p["embedding.weight"][x_t]
    B, L, hd = x_t.shape[0], c.length, c.head_dim
    for k in range(c.depth):
        pre = f"blocks.{k}."
        mod = F.linear(cond, p[pre + "modulation.weight"], p[pre + "modulation.bias"])
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, -1)
        y = modulated(h, shift1, scale1)
        qkv = F.linear(y, p[pre + "attn.qkv.weight"], p[pre + "attn.qkv.bias"]).view(B, L, 3, c.heads, hd)
        q = rotate(rms(qkv[:, :, 0], p[pre + "attn.q_norm.weight"]))
        kk = rotate(rms(qkv[:, :, 1], p[pre + "attn.k_norm.weight"]))
        v = qkv[:, :, 2]
        weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(hd), -1)
        attn = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, L, c.dim)
        h = h + gate1[:, None] * F.linear(attn, p[pre + "attn.out.weight"], p[pre + "attn.out.bias"])
        y = modulated(h, shift2, scale2)
        mlp = F.linear(F.gelu(F.linear(y, p[pre + "mlp.0.weight"], p[pre + "mlp.0.bias"]), approximate="tanh"),
                       p[pre + "mlp.2.weight"], p[pre + "mlp.2.bias"])  # fmt: skip
        h = h + gate2[:, None] * mlp
    shift, scale = F.linear(cond, p["head_modulation.weight"], p["head_modulation.bias"]).chunk(2, -1)
    logits = F.linear(modulated(h, shift, scale), p["head.weight"], p["head.bias"])
    out = torch.log_softmax(logits, -1)
    if c.process == "masked":  # SUBS
        carried = x_t != c.vocab_size
        point = torch.full_like(out, -math.inf)
        point[carried] = torch.where(
            torch.arange(c.vocab_size) == x_t[carried][:, None], 0.0, -math.inf
        ).double()  # fmt: skip
        out = torch.where(carried[..., None], point, out)
    return out


# ---- tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process", ["masked", "uniform"])
@pytest.mark.parametrize("fused_norm,backend", [(True, "difforge"), (False, "sdpa")])
def test_matches_reference_forward(process, fused_norm, backend):
    config = DiscreteTransformerConfig(**TINY, process=process, fused_norm=fused_norm, backend=backend)
    model = _randomized(config)
    x, alpha = _inputs(config, 3)
    if process == "masked":
        x[0, :4] = config.vocab_size  # make sure both kinds of position occur
    out = model(x, alpha)
    assert out.shape == (3, config.length, config.vocab_size) and out.dtype == torch.float32
    expected = reference_forward(model, x, alpha)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(out), finite)
    torch.testing.assert_close(out[finite].double(), expected[finite], rtol=1e-4, atol=1e-4)


def test_masked_carries_unmasked_tokens_and_normalizes_masked_rows():
    config = DiscreteTransformerConfig(**TINY, process="masked")
    model = _randomized(config)
    x, alpha = _inputs(config, 4)
    out = model(x, alpha)
    masked = x == config.vocab_size
    assert masked.any() and (~masked).any()
    carried = out[~masked]
    assert torch.equal(carried.argmax(-1), x[~masked]) and bool((carried.max(-1).values == 0).all())
    assert int(torch.isfinite(carried).sum()) == int((~masked).sum())  # -inf everywhere else
    rows = out[masked]
    assert bool(torch.isfinite(rows).all())
    torch.testing.assert_close(rows.logsumexp(-1), torch.zeros(len(rows)), atol=1e-5, rtol=0)


def test_untrained_model_predicts_uniform():
    config = DiscreteTransformerConfig(**TINY, process="uniform")
    out = DiscreteTransformer(config)(*_inputs(config, 2))
    torch.testing.assert_close(out, torch.full_like(out, -math.log(config.vocab_size)))


@pytest.fixture(scope="module")
def models():
    return {process: _randomized(DiscreteTransformerConfig(**TINY, process=process)) for process in PROCESSES}


@given(batch=st.integers(1, 5), process=st.sampled_from(PROCESSES), seed=st.integers(0, 2**16))
def test_rows_are_independent_of_the_batch_and_deterministic(models, batch, process, seed):
    model = models[process]
    config = model.config
    x, alpha = _inputs(config, batch, seed=seed)
    with torch.no_grad():
        out = model(x, alpha)
        assert torch.equal(out, model(x, alpha))
        for b in range(batch):
            torch.testing.assert_close(model(x[b : b + 1], alpha[b : b + 1])[0], out[b], rtol=1e-5, atol=1e-5)


def test_alpha_and_positions_matter():
    config = DiscreteTransformerConfig(**TINY, process="uniform")
    model = _randomized(config)
    x, alpha = _inputs(config, 2)
    with torch.no_grad():
        out = model(x, alpha)
        assert not torch.allclose(out, model(x, 1 - alpha), atol=1e-3)
        shifted = model(x.roll(1, dims=1), alpha)  # no position information would make this a roll of out
        assert not torch.allclose(shifted, out.roll(1, dims=1), atol=1e-3)
        scalar = model(x, torch.tensor(0.5))
        torch.testing.assert_close(scalar, model(x, torch.full((2,), 0.5)))


def test_gradients_reach_every_parameter():
    config = DiscreteTransformerConfig(**TINY, process="masked")
    model = _randomized(config)
    x, alpha = _inputs(config, 3)
    x[:, ::2] = config.vocab_size
    out = model(x, alpha)
    masked = x == config.vocab_size
    out[masked].gather(-1, torch.zeros(int(masked.sum()), 1, dtype=torch.long)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name


def test_default_config_and_one_dimensional_positions():
    config = DiscreteTransformerConfig()
    assert (config.vocab_size, config.length, config.grid, config.ffn, config.input_vocab) == (17, 64, (8, 8), 512, 18)
    assert config.mask_id == 17 and DiscreteTransformerConfig(process="uniform").mask_id is None
    line = DiscreteTransformerConfig(**{**TINY, "grid": None}, process="uniform")
    model = _randomized(line)
    x, alpha = _inputs(line, 2)
    # Without a grid every rotary pair turns with the index: the 2D reference on a 1 x L grid, all pairs on columns.
    angles = model.angles.double()
    pairs = line.head_dim // 2
    expected = torch.arange(line.length)[:, None] * line.rope_theta ** (-torch.arange(pairs) / pairs)
    torch.testing.assert_close(angles, expected.double(), rtol=1e-6, atol=1e-6)
    assert model(x, alpha).shape == (2, line.length, line.vocab_size)


def test_config_round_trip_and_validation():
    config = DiscreteTransformerConfig(**TINY, process="uniform", backend="sdpa")
    assert DiscreteTransformerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown fields"):
        DiscreteTransformerConfig.from_dict({"size": 3})
    bad = [dict(vocab_size=1), dict(process="absorbing"), dict(grid=(4, 4)), dict(heads=3), dict(dim=24, heads=4),
           dict(backend="flash"), dict(depth=0), dict(ffn=0)]  # fmt: skip
    for override in bad:
        with pytest.raises(ValueError, match="DiscreteTransformerConfig"):
            DiscreteTransformerConfig(**{**TINY, **override})


def test_bad_input():
    config = DiscreteTransformerConfig(**TINY)
    model = DiscreteTransformer(config)
    x, alpha = _inputs(config, 2)
    with pytest.raises(ValueError, match="x_t must be int64"):
        model(x.int(), alpha)
    with pytest.raises(ValueError, match="x_t must be int64"):
        model(x[:, :-1], alpha)
    with pytest.raises(ValueError, match="alpha must be"):
        model(x, alpha[:1])
    with pytest.raises(ValueError, match="alpha must be"):
        model(x, torch.ones(2, dtype=torch.long))
