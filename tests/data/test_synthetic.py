"""SyntheticVideoDataset: content against a reference renderer written here, determinism, condition tokens,
validation, and to_rgb."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from difforge.data import SyntheticVideoDataset, to_rgb

# The palette as documented (RGB in [0, 1]): red, orange, yellow, green, cyan, blue, magenta, white.
PALETTE = torch.tensor(
    [[1, 0, 0], [1, 0.5, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=torch.float64
)
# Compass directions as (dx, dy) per unit speed, north = towards row 0.
DIRECTIONS = [(0, -1), (1, -1), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1)]
SIZES = ((4, 16, 16), (3, 12, 20), (5, 8, 24))


def reference_coverage(attributes: dict, frames: int, height: int, width: int) -> torch.Tensor:
    """[T, H, W] shape coverage from the documented rules: constant velocity, wrap-around (nearest periodic
    image), distance per shape kind, coverage clamp(radius + 0.5 - distance, 0, 1)."""
    dx_unit, dy_unit = DIRECTIONS[attributes["direction"]]
    norm = math.hypot(dx_unit, dy_unit)
    out = torch.zeros(frames, height, width, dtype=torch.float64)
    for t in range(frames):
        cx = attributes["x0"] + attributes["speed"] * dx_unit / norm * t
        cy = attributes["y0"] + attributes["speed"] * dy_unit / norm * t
        xs = torch.arange(width, dtype=torch.float64)
        ys = torch.arange(height, dtype=torch.float64)
        ax = torch.stack([(xs - cx + k * width).abs() for k in range(-3, 4)]).amin(0).view(1, width)
        ay = torch.stack([(ys - cy + k * height).abs() for k in range(-3, 4)]).amin(0).view(height, 1)
        ax, ay = ax.expand(height, width), ay.expand(height, width)
        kind = attributes["shape"]
        if kind == 0:  # square
            d = torch.maximum(ax, ay)
        elif kind == 1:  # disk
            d = (ax**2 + ay**2).sqrt()
        elif kind == 2:  # cross: union of a horizontal and a vertical bar a third as wide as long
            d = torch.minimum(torch.maximum(ax, 3 * ay), torch.maximum(3 * ax, ay))
        else:  # diamond
            d = ax + ay
        out[t] = (attributes["radius"] + 0.5 - d).clamp(0, 1)
    return out


@pytest.fixture(scope="module")
def dataset():
    return SyntheticVideoDataset(96, channels=8, sizes=SIZES, context_len=7, context_dim=16, seed=5)


@pytest.fixture(scope="module")
def samples(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_shapes_dtypes_and_range(dataset, samples):
    for i, sample in enumerate(samples):
        t, h, w = dataset.shape_of(i)
        assert (t, h, w) in SIZES
        assert sample["latents"].shape == (8, t, h, w) and sample["latents"].dtype == torch.float32
        assert sample["context"].shape == (7, 16) and sample["context"].dtype == torch.float32
        assert sample["latents"].abs().max() <= 1.0
        for key in ("shape", "direction", "colour_start", "colour_end", "size"):
            assert type(sample["attributes"][key]) is int
    assert Counter(dataset.shape_of(i) for i in range(len(dataset))).keys() == set(SIZES)


def test_attributes_cover_their_ranges(samples):
    attributes = [s["attributes"] for s in samples]
    assert {a["shape"] for a in attributes} == {0, 1, 2, 3}
    assert {a["direction"] for a in attributes} == set(range(8))
    assert {a["size"] for a in attributes} == {0, 1, 2}
    assert {a["colour_start"] for a in attributes} == set(range(8))
    assert all(a["colour_start"] != a["colour_end"] for a in attributes)
    assert all(0.5 <= a["speed"] <= 1.5 for a in attributes)


def test_mask_channel_matches_reference_renderer(dataset, samples):
    for i, sample in enumerate(samples):
        coverage = reference_coverage(sample["attributes"], *dataset.shape_of(i))
        torch.testing.assert_close(sample["latents"][3].double(), 2 * coverage - 1, atol=1e-5, rtol=0)


def test_radius_follows_size_class(dataset, samples):
    for i, sample in enumerate(samples):
        _, h, w = dataset.shape_of(i)
        fraction = (0.12, 0.2, 0.28)[sample["attributes"]["size"]]
        assert sample["attributes"]["radius"] == pytest.approx(max(1.0, fraction * min(h, w)))


def test_eastward_shape_moves_right():
    # A square moving east, far from the edges of a wide frame, shifts its mask centroid by `speed` per frame.
    dataset = SyntheticVideoDataset(400, sizes=((6, 16, 64),), seed=1)
    for i in range(len(dataset)):
        sample = dataset[i]
        a = sample["attributes"]
        if a["direction"] == 2 and a["size"] == 0 and a["radius"] + 1 < a["x0"] < 64 - a["radius"] - 6 * 1.5 - 1:
            break
    else:
        pytest.fail("no eastward sample away from the edges")
    mask = (sample["latents"][3] + 1) / 2  # [T, H, W]
    xs = torch.arange(64, dtype=torch.float32)
    centroid_x = (mask.sum(1) * xs).sum(1) / mask.sum((1, 2))
    centroid_y = (mask.sum(2) * torch.arange(16.0)).sum(1) / mask.sum((1, 2))
    steps = centroid_x[1:] - centroid_x[:-1]
    # Anti-aliased corners sampled at pixel centres are not exactly shift-invariant: 5 % of a pixel.
    torch.testing.assert_close(steps, torch.full_like(steps, a["speed"]), atol=0.05, rtol=0)
    torch.testing.assert_close(centroid_y, torch.full_like(centroid_y, centroid_y[0].item()), atol=0.05, rtol=0)


def test_colour_interpolates_and_background_is_dark(dataset, samples):
    for i, sample in enumerate(samples):
        t_len = dataset.shape_of(i)[0]
        a = sample["attributes"]
        coverage = reference_coverage(a, *dataset.shape_of(i))
        rgb = sample["latents"][:3].double()
        for t in range(t_len):
            alpha = t / (t_len - 1)
            expected = 2 * ((1 - alpha) * PALETTE[a["colour_start"]] + alpha * PALETTE[a["colour_end"]]) - 1
            inside = coverage[t] == 1
            if inside.any():
                torch.testing.assert_close(rgb[:, t][:, inside], expected[:, None].expand(3, int(inside.sum())))
            outside = coverage[t] == 0
            assert rgb[:, t][:, outside].max() < -0.5  # dark background
        # The background does not change where the shape never passes.
        never = (coverage == 0).all(0)
        torch.testing.assert_close(rgb[:, 0][:, never], rgb[:, -1][:, never])


def test_feature_channels(dataset, samples):
    for i, sample in enumerate(samples):
        latents = sample["latents"].double()
        mask = (latents[3] + 1) / 2
        blurred = sum(torch.roll(mask, (dy, dx), (1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
        torch.testing.assert_close(latents[4], 2 * blurred - 1, atol=1e-5, rtol=0)
        luminance = 0.299 * latents[0] + 0.587 * latents[1] + 0.114 * latents[2]
        torch.testing.assert_close(latents[5], luminance, atol=1e-5, rtol=0)
        assert latents[6:].abs().max() < 1.0 and latents[6:].std() > 0.05
        assert not torch.allclose(latents[6], latents[7])


def test_channel_count_truncates_the_same_features():
    four = SyntheticVideoDataset(10, channels=4, seed=3)
    eight = SyntheticVideoDataset(10, channels=8, seed=3)
    three = SyntheticVideoDataset(10, channels=3, seed=3)
    for i in range(10):
        assert torch.equal(four[i]["latents"], eight[i]["latents"][:4])
        assert torch.equal(three[i]["latents"], eight[i]["latents"][:3])


def test_deterministic_across_instances_and_global_rng(dataset):
    first = dataset[17]
    torch.manual_seed(999)
    again = SyntheticVideoDataset(96, channels=8, sizes=SIZES, context_len=7, context_dim=16, seed=5)[17]
    assert torch.equal(first["latents"], again["latents"]) and torch.equal(first["context"], again["context"])
    assert first["attributes"] == again["attributes"]
    other_seed = SyntheticVideoDataset(96, channels=8, sizes=SIZES, context_len=7, context_dim=16, seed=6)
    assert other_seed[17]["attributes"] != first["attributes"]
    # Sample i does not depend on the dataset length.
    longer = SyntheticVideoDataset(500, channels=8, sizes=SIZES, context_len=7, context_dim=16, seed=5)
    assert torch.equal(longer[17]["latents"], first["latents"])


def test_context_encodes_attributes(samples):
    contexts = torch.stack([s["context"] for s in samples])  # [N, 7, 16]
    attributes = [s["attributes"] for s in samples]
    torch.testing.assert_close(contexts.norm(dim=-1), torch.ones(contexts.shape[:2]))
    # Rows 5, 6 are one padding embedding, the same everywhere.
    assert torch.equal(contexts[:, 5:], contexts[:1, 5:6].expand(len(samples), 2, 16))
    for row, key in enumerate(["shape", "direction", "colour_start", "colour_end", "size"]):
        by_value = {}
        for context, a in zip(contexts, attributes):
            by_value.setdefault(a[key], []).append(context[row])
        for rows in by_value.values():  # one embedding per attribute value ...
            assert all(torch.equal(r, rows[0]) for r in rows)
        firsts = torch.stack([rows[0] for rows in by_value.values()])
        gram = firsts @ firsts.T - torch.eye(len(firsts))
        assert gram.abs().max() < 0.99  # ... and distinct values have distinct embeddings
    # A colour as start and as end are different symbols.
    start = {a["colour_start"]: c[2] for c, a in zip(contexts, attributes)}
    end = {a["colour_end"]: c[3] for c, a in zip(contexts, attributes)}
    shared = set(start) & set(end)
    assert shared and all(not torch.allclose(start[k], end[k]) for k in shared)


def test_short_context_keeps_leading_tokens():
    full = SyntheticVideoDataset(4, context_len=8, context_dim=12, seed=9)
    short = SyntheticVideoDataset(4, context_len=2, context_dim=12, seed=9)
    for i in range(4):
        assert torch.equal(short[i]["context"], full[i]["context"][:2])


def test_tokens_of():
    dataset = SyntheticVideoDataset(50, sizes=((8, 32, 32), (3, 6, 10)))
    for i in range(50):
        if dataset.shape_of(i) == (8, 32, 32):
            assert dataset.tokens_of(i) == 8 * 16 * 16
            assert dataset.tokens_of(i, (2, 4, 8)) == 4 * 8 * 4
        else:
            assert dataset.tokens_of(i, (3, 2, 2)) == 1 * 3 * 5
            with pytest.raises(ValueError, match="divisible"):
                dataset.tokens_of(i, (2, 2, 2))
    with pytest.raises(ValueError, match="patch"):
        dataset.tokens_of(0, (1, 0, 2))


def test_index_errors():
    dataset = SyntheticVideoDataset(3)
    for index in (-1, 3, 100):
        with pytest.raises(IndexError):
            dataset[index]
        with pytest.raises(IndexError):
            dataset.shape_of(index)
    assert len(dataset) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"channels": 2}, "channels"),
        ({"sizes": ()}, "sizes"),
        ({"sizes": ((4, 16),)}, r"sizes\[0\]"),
        ({"sizes": ((4, 16, 16), (4, 0, 16))}, r"sizes\[1\]"),
        ({"sizes": ((4, 16.0, 16),)}, r"sizes\[0\]"),
        ({"context_len": 0}, "context_len"),
        ({"context_dim": 0}, "context_dim"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    args = {"num_samples": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        SyntheticVideoDataset(**args)


def test_to_rgb_by_hand():
    latents = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0, 0.5]).view(1, 1, 1, 6).expand(4, 1, 1, 6).clone()
    latents[1] *= -1
    latents[3] = 7.0  # channels beyond RGB are ignored
    frames = to_rgb(latents)
    assert frames.shape == (1, 1, 6, 3) and frames.dtype == torch.uint8
    # (x + 1) * 127.5, clamped, rounded half to even: 0 -> 127.5 -> 128, 0.5 -> 191.25 -> 191.
    assert frames[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0, 191]
    assert frames[0, 0, :, 1].tolist() == [255, 128, 0, 0, 255, 64]


def test_to_rgb_layout_and_errors():
    sample = SyntheticVideoDataset(1, sizes=((3, 8, 12),))[0]["latents"]
    frames = to_rgb(sample)
    assert frames.shape == (3, 8, 12, 3)
    assert frames[2, 5, 7].tolist() == [round((float(sample[c, 2, 5, 7]) + 1) * 127.5) for c in range(3)]
    with pytest.raises(ValueError, match="channels"):
        to_rgb(sample[:2])
    with pytest.raises(ValueError, match="float"):
        to_rgb(sample[0])
    with pytest.raises(ValueError, match="float"):
        to_rgb(torch.zeros(3, 1, 2, 2, dtype=torch.int64))


def test_cache_returns_the_rendered_samples_within_its_budget():
    plain = SyntheticVideoDataset(6, sizes=((2, 8, 8),))
    one_sample = sum(t.numel() * t.element_size() for t in (plain[0]["latents"], plain[0]["context"]))
    cached = SyntheticVideoDataset(6, sizes=((2, 8, 8),), cache_bytes=2 * one_sample)
    for i in range(6):
        assert torch.equal(cached[i]["latents"], plain[i]["latents"])
        assert torch.equal(cached[i]["context"], plain[i]["context"])
    assert cached[0]["latents"] is cached[0]["latents"] and cached[1]["latents"] is cached[1]["latents"]
    assert cached[2]["latents"] is not cached[2]["latents"]  # over budget: rendered again
    with pytest.raises(IndexError):
        cached[6]
