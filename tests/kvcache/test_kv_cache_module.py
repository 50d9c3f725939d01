"""difforge.nn.QuantizedKVCache: frame layout and eviction order, sinks never evicted, quantize-once (spec
kv_cache_jensen §5 invariant 8), memory accounting, capacity errors, bad input, and attention() against a
float64 reference written here (own unpacking and dequantization of the ring, own Hadamard matrix, the Jensen
taylor2 bias subtracted from the quantized keys' logits only)."""

from __future__ import annotations

import collections
import math

import pytest
import torch

import difforge.ops as ops
from difforge.nn import QuantizedKVCache
from difforge.ops import kvcache as kv_ops

# ---- plain-PyTorch references (never calling difforge) ----


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., D*bits/8]`` -> int64 ``[..., D]``: channel c sits at bits [bits*c % 8, +bits) of byte
    bits*c // 8."""
    channels = torch.arange(codes.shape[-1] * 8 // bits, device=codes.device)
    byte = codes.long()[..., (bits * channels) // 8]
    return (byte >> ((bits * channels) % 8)) & ((1 << bits) - 1)


def dequantize(codes, step, zero, bits: int, group_size: int) -> torch.Tensor:
    """float64 ``zero + step * code`` ``[B, L, H, D]`` for token-axis groups of ``group_size`` channels."""
    expand = lambda t: t.double().repeat_interleave(group_size, dim=-1)  # noqa: E731
    return expand(zero) + expand(step) * unpack(codes, bits).double()


def hadamard(d: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def reference_attention(q, segments, scale: float, lam: float, group_size: int) -> torch.Tensor:
    """float64 softmax attention of q ``[B, Lq, Hq, D]`` over the keys of every segment ``(k, v, step)``
    (``[B, L, Hkv, D]``; ``step`` ``[B, L, Hkv, D/g]`` for quantized keys, None otherwise). Quantized keys'
    logits lose ``lam * sum_c (scale * q_c * step_{j, group(c)} / 2)**2 / 6`` (Jensen, taylor2)."""
    q = q.double()
    reps = q.shape[2] // segments[0][0].shape[2]
    logits, values = [], []
    for k, v, step in segments:
        k, v = k.double().repeat_interleave(reps, 2), v.double().repeat_interleave(reps, 2)
        logit = scale * torch.einsum("blhc,bkhc->bhlk", q, k)
        if step is not None:
            step_c = step.double().repeat_interleave(group_size, -1).repeat_interleave(reps, 2)
            logit = logit - lam * torch.einsum("blhc,bkhc->bhlk", (scale * q / 2) ** 2 / 6, step_c**2)
        logits.append(logit)
        values.append(v)
    p = torch.cat(logits, -1).softmax(-1)
    return torch.einsum("bhlk,bkhc->blhc", p, torch.cat(values, 1))


class LayoutModel:
    """The expected layout as plain lists: sinks fill first, then a FIFO window, then a FIFO ring."""

    def __init__(self, sink: int, window: int, cap: int):
        self.S, self.W, self.cap = sink, window, cap
        self.sink, self.window, self.ring = [], collections.deque(), collections.deque()
        self.next_id = 0

    def commit(self, n: int) -> None:
        for _ in range(n):
            fid, self.next_id = self.next_id, self.next_id + 1
            if len(self.sink) < self.S:
                self.sink.append(fid)
                continue
            self.window.append(fid)
            if len(self.window) > self.W:
                leaving = self.window.popleft()
                if self.cap:
                    if len(self.ring) == self.cap:
                        self.ring.popleft()  # the oldest quantized frame goes first
                    self.ring.append(leaving)

    def ids(self):
        return tuple(self.sink), tuple(self.window), tuple(self.ring)


# ---- helpers ----

SMALL = {"batch": 1, "heads_kv": 2, "head_dim": 64, "tokens_per_frame": 4}


def make_cache(device="cpu", **overrides) -> QuantizedKVCache:
    options = {**SMALL, "sink_frames": 1, "recent_frames": 2, "max_quantized_frames": 3, "device": device}
    return QuantizedKVCache(**{**options, **overrides})


def random_frames(cache: QuantizedKVCache, n_frames: int, gen: torch.Generator, scale: float = 1.0):
    shape = (cache.batch, n_frames * cache.tokens_per_frame, cache.heads_kv, cache.head_dim)

    def draw():
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float32)).to(cache.dtype).to(cache.device)

    return draw(), draw()


def frame_of(t: torch.Tensor, i: int, tpf: int) -> torch.Tensor:
    return t[:, i * tpf : (i + 1) * tpf]


def commit(cache, originals: dict, n_frames: int, gen: torch.Generator, scale: float = 1.0):
    """Append n frames of random K/V; remember each frame's original tensors by frame id."""
    k, v = random_frames(cache, n_frames, gen, scale)
    first = cache.num_frames
    cache.append(k, v)
    for i in range(n_frames):
        tpf = cache.tokens_per_frame
        originals[first + i] = (frame_of(k, i, tpf).clone(), frame_of(v, i, tpf).clone())
    return k, v


def buffers(cache):
    return {n: getattr(cache, n) for n in ("k_dense", "v_dense", "k_codes", "k_step", "k_zero", "v_codes",
                                           "v_step", "v_zero")}  # fmt: skip


# ---- layout and eviction order ----

LAYOUT_CASES = {  # (sink, window, capacity, chunk sizes in frames)
    "sink2_window3_cap4": (2, 3, 4, [3, 3, 3, 3, 3, 3]),
    "no_window": (1, 0, 3, [1, 2, 3, 1, 3, 1]),
    "no_sink": (0, 2, 2, [5, 1, 1, 2]),
    "longlive_3sink_9window": (3, 9, 5, [3] * 10),
    "no_quantized_region": (2, 1, 0, [2, 2, 3]),
    "chunk_longer_than_window_and_ring": (1, 1, 2, [1, 7, 2]),
    "only_sinks_yet": (4, 2, 2, [1, 2]),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES), ids=list(LAYOUT_CASES))
def test_frames_flow_sink_window_ring_and_the_oldest_quantized_frame_is_evicted_first(case):
    sink, window, cap, chunks = LAYOUT_CASES[case]
    cache = make_cache(heads_kv=1, head_dim=32, tokens_per_frame=2, sink_frames=sink, recent_frames=window,
                       max_quantized_frames=cap)  # fmt: skip
    model = LayoutModel(sink, window, cap)
    gen = torch.Generator().manual_seed(0)
    assert cache.frame_ids() == ((), (), ())
    committed = 0
    for n in chunks:
        cache.append(*random_frames(cache, n, gen))
        model.commit(n)
        committed += n
        layout = cache.frame_ids()
        assert (layout.sink, layout.window, layout.quantized) == model.ids(), f"after {committed} frames"
        assert cache.num_frames == committed
        held = set(layout.sink) | set(layout.window) | set(layout.quantized)
        for fid in range(committed):
            where = cache.locate(fid)
            assert (where is None) == (fid not in held), fid
            if where is not None:
                assert where[0] == ("quantized" if fid in layout.quantized else "dense")
        assert cache.locate(committed) is None


def test_eviction_order_by_hand():
    """1 sink, 2 window, 3 quantized slots, chunks of 3 frames: written out, not simulated."""
    cache = make_cache(tokens_per_frame=2)
    gen = torch.Generator().manual_seed(1)
    expected = [
        ((0,), (1, 2), ()),
        ((0,), (4, 5), (1, 2, 3)),
        ((0,), (7, 8), (4, 5, 6)),  # 1, 2, 3 evicted, oldest first
        ((0,), (10, 11), (7, 8, 9)),
    ]
    for want in expected:
        cache.append(*random_frames(cache, 3, gen))
        assert tuple(cache.frame_ids()) == want
    cache.append(*random_frames(cache, 1, gen))
    assert tuple(cache.frame_ids()) == ((0,), (11, 12), (8, 9, 10))


def test_sinks_and_window_hold_the_committed_values_bitwise(device):
    cache = make_cache(device, sink_frames=2, recent_frames=2, max_quantized_frames=2)
    gen = torch.Generator().manual_seed(2)
    originals = {}
    for n in (1, 2, 3, 2, 2, 3, 1, 4):
        commit(cache, originals, n, gen)
        layout = cache.frame_ids()
        assert layout.sink == tuple(range(min(cache.num_frames, 2)))
        for fid in layout.sink + layout.window:
            region, tokens = cache.locate(fid)
            assert region == "dense"
            assert torch.equal(cache.k_dense[:, tokens], originals[fid][0]), fid
            assert torch.equal(cache.v_dense[:, tokens], originals[fid][1]), fid
    assert cache.num_frames == 18
    assert torch.equal(cache.k_dense[:, : 2 * cache.tokens_per_frame], torch.cat([originals[0][0], originals[1][0]], 1))


# ---- quantize once ----


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("window", [0, 2])
def test_quantized_frames_are_written_once_and_equal_kv_quantize_of_the_frame(device, bits, window):
    cache = make_cache(device, bits=bits, sink_frames=1, recent_frames=window, max_quantized_frames=3)
    gen = torch.Generator().manual_seed(3)
    originals, snapshots = {}, {}
    expand = lambda t: t.double().repeat_interleave(32, -1)  # noqa: E731
    ptrs = {name: t.data_ptr() for name, t in buffers(cache).items()}
    for n in (2, 1, 3, 1, 2, 2, 1):
        commit(cache, originals, n, gen)
        layout = cache.frame_ids()
        for fid in layout.quantized:
            region, tokens = cache.locate(fid)
            assert region == "quantized"
            stored = tuple(t[:, tokens].clone() for t in (cache.k_codes, cache.k_step, cache.k_zero,
                                                         cache.v_codes, cache.v_step, cache.v_zero))  # fmt: skip
            if fid not in snapshots:  # just committed to the ring: quantized from the frame's original values
                k, v = originals[fid]
                quantize = {"bits": bits, "group_size": 32, "axis": "token", "meta_dtype": torch.float16}
                want = (*ops.kv_quantize(k, **quantize), *ops.kv_quantize(v, **quantize))
                for got, expected in zip(stored, want, strict=True):
                    assert torch.equal(got, expected), fid
                # and, independently of the op: the stored grid reproduces the frame within step / 2
                for (codes, step, zero), x in ((stored[:3], k), (stored[3:], v)):
                    err = (dequantize(codes, step, zero, bits, 32) - x.double()).abs()
                    # step / 2, plus the fp16 rounding of step (times the top code) and of zero
                    slack = 0.505 + (2**bits - 1) * 2.0**-11
                    bound = expand(step) * slack + 2e-3 * (x.double().abs() + expand(zero).abs()) + 1e-6
                    assert bool((err <= bound).all()), fid
                snapshots[fid] = stored
            else:  # bitwise unchanged since its commit: never re-quantized, never overwritten
                for got, first in zip(stored, snapshots[fid], strict=True):
                    assert torch.equal(got, first), fid
        for fid in list(snapshots):
            if fid not in layout.quantized:
                assert cache.locate(fid) is None  # evicted
                del snapshots[fid]
    assert len(snapshots) == 3
    assert {name: t.data_ptr() for name, t in buffers(cache).items()} == ptrs  # storage allocated once


def test_reset_forgets_frames_and_keeps_storage():
    cache = make_cache()
    gen = torch.Generator().manual_seed(4)
    ptrs = {name: t.data_ptr() for name, t in buffers(cache).items()}
    cache.append(*random_frames(cache, 7, gen))
    cache.reset()
    assert cache.num_frames == 0 and cache.frame_ids() == ((), (), ())
    assert cache.stored_nbytes == 0
    k, v = random_frames(cache, 2, gen)
    cache.append(k, v)
    assert tuple(cache.frame_ids()) == ((0,), (1,), ())
    assert torch.equal(cache.k_dense[:, :8], k)
    assert {name: t.data_ptr() for name, t in buffers(cache).items()} == ptrs


# ---- memory ----


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("meta_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_memory_numbers_follow_the_layout(bits, meta_dtype):
    B, H, D, tpf, S, W, cap, g = 2, 3, 64, 4, 1, 2, 5, 32
    cache = make_cache(batch=B, heads_kv=H, head_dim=D, tokens_per_frame=tpf, sink_frames=S, recent_frames=W,
                       max_quantized_frames=cap, bits=bits, group_size=g, meta_dtype=meta_dtype)  # fmt: skip
    meta_bytes = torch.finfo(meta_dtype).bits // 8
    dense_frame = 2 * B * tpf * H * D * 2  # K and V, bf16
    quant_frame = 2 * B * tpf * H * (D * bits // 8 + 2 * (D // g) * meta_bytes)
    assert cache.nbytes == (S + W) * dense_frame + cap * quant_frame
    assert cache.quantized_nbytes == cap * quant_frame
    assert cache.bf16_nbytes == (S + W + cap) * dense_frame
    allocated = sum(t.untyped_storage().nbytes() for t in buffers(cache).values())
    assert cache.nbytes == allocated
    assert cache.effective_bits == bits + 2 * 8 * meta_bytes / g
    assert cache.quantized_nbytes / (cap * dense_frame) == cache.effective_bits / 16

    gen = torch.Generator().manual_seed(5)
    filled = [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (3, 4), (3, 5), (3, 5)]  # after 0, 1, ... frames
    for step_frames, (dense, quantized) in enumerate(filled):
        if step_frames:
            cache.append(*random_frames(cache, 1 if step_frames < 5 else 3, gen))
        assert cache.stored_nbytes == dense * dense_frame + quantized * quant_frame
        assert cache.bf16_stored_nbytes == (dense + quantized) * dense_frame


def test_int2_g32_fp16_takes_three_sixteenths_of_bf16():
    cache = make_cache(sink_frames=0, recent_frames=0, max_quantized_frames=21, bits=2)
    assert cache.effective_bits == 3.0
    assert cache.quantized_nbytes == cache.nbytes
    assert cache.nbytes / cache.bf16_nbytes == 3 / 16 == 0.1875
    int4 = make_cache(sink_frames=0, recent_frames=0, max_quantized_frames=21, bits=4)
    assert int4.effective_bits == 5.0 and int4.nbytes / int4.bf16_nbytes == 5 / 16


# ---- capacity ----


def test_overflow_error_names_the_capacity_and_changes_nothing():
    cache = make_cache(sink_frames=1, recent_frames=1, max_quantized_frames=2, overflow="error")
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):  # frame 0 sink, 3 window, 1 and 2 quantized: the ring is full
        cache.append(*random_frames(cache, 1, gen))
    assert tuple(cache.frame_ids()) == ((0,), (3,), (1, 2))
    before = {name: t.clone() for name, t in buffers(cache).items()}
    for n in (1, 3):
        with pytest.raises(RuntimeError, match=r"max_quantized_frames=2"):
            cache.append(*random_frames(cache, n, gen))
        assert cache.num_frames == 4 and tuple(cache.frame_ids()) == ((0,), (3,), (1, 2))
        for name, t in buffers(cache).items():
            assert torch.equal(t, before[name]), name

    fresh = make_cache(sink_frames=1, recent_frames=1, max_quantized_frames=2, overflow="error")
    with pytest.raises(RuntimeError, match=r"quantized region is full.*max_quantized_frames=2"):
        fresh.append(*random_frames(fresh, 5, gen))  # 3 frames would need quantizing
    assert fresh.num_frames == 0
    fresh.append(*random_frames(fresh, 4, gen))  # exactly full is fine
    assert tuple(fresh.frame_ids()) == ((0,), (3,), (1, 2))


# ---- attention ----


def _expected_segments(cache, originals, rotate_keys=None):
    """[(the quantized frames dequantized from their ring slots, values, step)] + the unquantized frames taken
    from the originals."""
    layout = cache.frame_ids()
    bits, g = cache.bits, cache.group_size
    segments = []
    if layout.quantized:
        slots = [cache.locate(f)[1] for f in layout.quantized]

        def gather(t):
            return torch.cat([t[:, tokens] for tokens in slots], 1)

        k_hat = dequantize(gather(cache.k_codes), gather(cache.k_step), gather(cache.k_zero), bits, g)
        v_hat = dequantize(gather(cache.v_codes), gather(cache.v_step), gather(cache.v_zero), bits, g)
        segments.append((k_hat, v_hat, gather(cache.k_step)))
    dense = layout.sink + layout.window
    if dense:
        k = torch.cat([originals[f][0] for f in dense], 1).double()
        v = torch.cat([originals[f][1] for f in dense], 1).double()
        segments.append((k if rotate_keys is None else rotate_keys(k), v, None))
    return segments


def _build(device, dtype, bits, frames=(3, 3, 3), seed=7, **options):
    cache = make_cache(device, dtype=dtype, bits=bits, **options)
    gen = torch.Generator().manual_seed(seed)
    originals = {}
    for n in frames:
        commit(cache, originals, n, gen)
    return cache, originals, gen


TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float32: 1e-4}


RING_STATES = {  # chunks committed -> expected layout (1 sink, 2 window, 3 quantized slots)
    "ring_wrapped": ((3, 3, 3), ((0,), (7, 8), (4, 5, 6))),
    "ring_partly_filled": ((3, 2), ((0,), (3, 4), (1, 2))),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("scale", "lam"), [(None, 1.0), (0.3, 2.0)], ids=["default_scale", "scale0.3_lambda2"])
@pytest.mark.parametrize("ring", list(RING_STATES))
def test_attention_matches_a_float64_reference_with_the_bias_on_quantized_keys_only(
    device, dtype, bits, scale, lam, ring
):
    frames, layout = RING_STATES[ring]
    cache, originals, gen = _build(device, dtype, bits, frames=frames, jensen_lambda=lam)
    assert tuple(cache.frame_ids()) == layout
    Hq = 4  # grouped-query attention over heads_kv = 2
    q_scale = 4.0 if bits == 2 else 8.0  # large |q|: a bias well above the tolerance (INT4 steps are ~5x smaller)
    q = (q_scale * torch.randn(1, 8, Hq, 64, generator=gen)).to(dtype).to(device)
    k_cur, v_cur = random_frames(cache, 2, gen)
    out = cache.attention(q, k_cur, v_cur, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device

    s = 1 / math.sqrt(64) if scale is None else scale
    segments = [*_expected_segments(cache, originals), (k_cur, v_cur, None)]
    want = reference_attention(q, segments, s, lam, 32)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)

    # The test can tell the bias apart: without it (or with it on every key) the reference moves well past tol.
    unbiased = reference_attention(q, segments, s, 0.0, 32)
    assert (unbiased - want).abs().max() > 5 * tol
    everywhere = [(k, v, step if step is not None else torch.full_like(segments[0][2][:, :1], 0.5).expand(
        k.shape[0], k.shape[1], k.shape[2], -1)) for k, v, step in segments]  # fmt: skip
    assert (reference_attention(q, everywhere, s, lam, 32) - want).abs().max() > 5 * tol
    torch.testing.assert_close(cache.attention(q, k_cur, v_cur, scale=scale, jensen="none").double(), unbiased,
                               atol=tol, rtol=tol)  # fmt: skip


def test_attention_passes_views_of_the_storage_to_the_op(monkeypatch):
    cache, _, gen = _build("cpu", torch.bfloat16, 2)
    seen = {}
    real = kv_ops.quantized_kv_attention

    def spy(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(kv_ops, "quantized_kv_attention", spy)
    q = torch.randn(1, 4, 2, 64, generator=gen).bfloat16()
    k_cur, v_cur = random_frames(cache, 1, gen)
    cache.attention(q, k_cur, v_cur)
    args, kwargs = seen["args"], seen["kwargs"]
    for arg, buffer in zip(args[3:9], (cache.k_codes, cache.k_step, cache.k_zero, cache.v_codes, cache.v_step,
                                       cache.v_zero), strict=True):  # fmt: skip
        assert arg.data_ptr() == buffer.data_ptr() and arg.shape[1] == 3 * cache.tokens_per_frame
    for name, buffer in (("k_sink", cache.k_dense), ("v_sink", cache.v_dense)):
        assert kwargs[name].data_ptr() == buffer.data_ptr() and kwargs[name].shape[1] == 3 * cache.tokens_per_frame
    assert kwargs["jensen"] == "taylor2" and kwargs["bits"] == 2


@pytest.mark.parametrize("frames", [(), (1,), (2,)], ids=["empty", "sink_only", "sink_and_window"])
def test_attention_before_anything_is_quantized(device, frames):
    cache, originals, gen = _build(device, torch.float32, 2, frames=frames)
    assert cache.frame_ids().quantized == ()
    q = torch.randn(1, 5, 2, 64, generator=gen).to(device)
    k_cur, v_cur = random_frames(cache, 1, gen)
    out = cache.attention(q, k_cur, v_cur)
    want = reference_attention(q, [*_expected_segments(cache, originals), (k_cur, v_cur, None)], 1 / 8, 1.0, 32)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_rotated_cache_matches_the_reference_in_the_rotated_basis(device):
    """rotate=True: keys are quantized after the Hadamard rotation, and q, k_cur and the stored keys are rotated
    alike; the bias uses the rotated query."""
    cache, originals, gen = _build(device, torch.bfloat16, 2, rotate=True)
    R = hadamard(64).to(device)
    layout = cache.frame_ids()
    for fid in layout.quantized:  # the ring holds the rotated keys (to within step / 2) and unrotated values
        _, tokens = cache.locate(fid)
        k_hat = dequantize(cache.k_codes[:, tokens], cache.k_step[:, tokens], cache.k_zero[:, tokens], 2, 32)
        v_hat = dequantize(cache.v_codes[:, tokens], cache.v_step[:, tokens], cache.v_zero[:, tokens], 2, 32)
        for x_hat, x, step in ((k_hat, originals[fid][0].double() @ R, cache.k_step[:, tokens]),
                               (v_hat, originals[fid][1].double(), cache.v_step[:, tokens])):  # fmt: skip
            bound = step.double().repeat_interleave(32, -1) * 0.505 + 1e-2 * x.abs() + 1e-6
            assert bool(((x_hat - x).abs() <= bound).all()), fid
    for fid in layout.sink + layout.window:  # bf16 copies of the rotated keys
        _, tokens = cache.locate(fid)
        torch.testing.assert_close(cache.k_dense[:, tokens].double(), originals[fid][0].double() @ R,
                                   atol=2e-2, rtol=1e-2)  # fmt: skip

    q = (4.0 * torch.randn(1, 8, 2, 64, generator=gen)).bfloat16().to(device)
    k_cur, v_cur = random_frames(cache, 2, gen)
    out = cache.attention(q, k_cur, v_cur)
    # The cache stores (and the kernel reads) the rotated tensors in bf16: so does the reference.
    rotate = lambda x: (x.double() @ R).bfloat16()  # noqa: E731
    segments = [*_expected_segments(cache, originals, rotate_keys=rotate), (rotate(k_cur), v_cur, None)]
    want = reference_attention(rotate(q), segments, 1 / 8, 1.0, 32)
    torch.testing.assert_close(out.double(), want, atol=1.5e-2, rtol=1.5e-2)
    unbiased = reference_attention(rotate(q), segments, 1 / 8, 0.0, 32)
    assert (unbiased - want).abs().max() > 5 * 1.5e-2  # the comparison sees the bias


def test_rotated_int8_cache_stays_close_to_unquantized_attention(device):
    cache, originals, gen = _build(device, torch.bfloat16, 8, rotate=True)
    q = torch.randn(1, 8, 2, 64, generator=gen).bfloat16().to(device)
    k_cur, v_cur = random_frames(cache, 2, gen)
    out = cache.attention(q, k_cur, v_cur)
    layout = cache.frame_ids()
    held = layout.quantized + layout.sink + layout.window
    k_all = torch.cat([originals[f][0] for f in held] + [k_cur], 1)
    v_all = torch.cat([originals[f][1] for f in held] + [v_cur], 1)
    plain = reference_attention(q, [(k_all, v_all, None)], 1 / 8, 0.0, 32)  # no rotation, no quantization
    torch.testing.assert_close(out.double(), plain, atol=2e-2, rtol=2e-2)


# ---- bad input ----


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"bits": 3}, "bits"),
        ({"group_size": 48}, "group_size"),
        ({"group_size": 0}, "group_size"),
        ({"overflow": "drop"}, "overflow"),
        ({"sink_frames": -1}, "sink_frames"),
        ({"max_quantized_frames": 2.0}, "max_quantized_frames"),
        ({"tokens_per_frame": 0}, "tokens_per_frame"),
        ({"jensen": "order2"}, "jensen"),
        ({"dtype": torch.int8}, "dtype"),
        ({"head_dim": 96, "rotate": True}, "power-of-two"),
    ],
)
def test_constructor_rejects_bad_configuration(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_cache(**overrides)


def test_append_rejects_bad_input():
    cache = make_cache()
    gen = torch.Generator().manual_seed(8)
    k, v = random_frames(cache, 2, gen)
    bad = [
        ((k[:, :5], v[:, :5]), ValueError, r"whole frames.*tokens_per_frame=4"),
        ((k[:, :0], v[:, :0]), ValueError, "no frame"),
        ((k, v[:, :4]), ValueError, "shapes differ"),
        ((k[:, :, :1], v[:, :, :1]), ValueError, r"k must have shape \[1, L, 2, 64\]"),
        ((k[..., :32], v[..., :32]), ValueError, "k must have shape"),
        ((k.expand(2, -1, -1, -1), v), ValueError, "k must have shape"),
        ((k[0], v[0]), ValueError, "k must have shape"),
        ((k.float(), v.float()), TypeError, r"k must be torch.bfloat16 \(the cache dtype\), got torch.float32"),
        ((k, v.half()), TypeError, "v must be torch.bfloat16"),
        ((k.to("meta"), v.to("meta")), ValueError, "on meta"),
        ((k.tolist(), v), TypeError, "k must be a Tensor"),
    ]
    for args, error, match in bad:
        with pytest.raises(error, match=match):
            cache.append(*args)
        assert cache.num_frames == 0


def test_attention_rejects_bad_input():
    cache, _, gen = _build("cpu", torch.bfloat16, 2)
    q = torch.randn(1, 4, 4, 64, generator=gen).bfloat16()
    k_cur, v_cur = random_frames(cache, 1, gen)
    bad = [
        ((q[:, :, :3], k_cur, v_cur), {}, ValueError, "heads_kv=2 dividing Hq"),
        ((q[..., :32], k_cur, v_cur), {}, ValueError, "q must have shape"),
        ((q.float(), k_cur, v_cur), {}, TypeError, "q must be torch.bfloat16"),
        ((q, k_cur[:, :, :1], v_cur), {}, ValueError, "k_cur must have shape"),
        ((q, k_cur, v_cur[:, :2]), {}, ValueError, "shapes differ"),
        ((q, k_cur, v_cur.float()), {}, TypeError, "v_cur must be torch.bfloat16"),
        ((q, k_cur.to("meta"), v_cur), {}, ValueError, "on meta"),
        ((q, k_cur, v_cur), {"jensen": "order2"}, ValueError, "jensen"),
    ]
    for args, kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            cache.attention(*args, **kwargs)
