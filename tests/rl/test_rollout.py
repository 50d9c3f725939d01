"""SDE rollouts (difforge.rl.rollout): reproducible per-candidate noise, batch-invariant regeneration, NVFP4 vs full
precision, log-probabilities recomputed for the loss, and Sol-RL's contrastive selection."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from difforge.models import VideoDiT
from difforge.pipelines.video_model import quantize_for_rollouts
from difforge.rl.grpo import select_contrastive
from difforge.rl.rollout import candidate_noise, log_probs, sample_sde, sample_sde_videos, step_log_prob

SHAPE = (4, 2, 8, 8)  # C, T, H, W
STEPS = 4


@pytest.fixture(scope="module")
def model() -> VideoDiT:
    """The tiny DiT with a random (not zero) output head, so that its velocity is not 0."""
    torch.manual_seed(0)
    dit = VideoDiT("tiny").eval()
    nn.init.normal_(dit.head.weight, std=0.2)
    return dit.requires_grad_(False)


def _context(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(seed))


class LinearField(nn.Module):
    """v = a x + b t: a velocity whose trajectory the test can follow with a float64 formula."""

    def forward(self, x, t, context):
        return 0.3 * x + 0.5 * t.view(-1, *([1] * (x.dim() - 1)))


def test_candidate_noise_is_a_function_of_the_seed():
    noise, eps = candidate_noise(7, SHAPE, STEPS)
    again, eps_again = candidate_noise(7, SHAPE, STEPS)
    other, _ = candidate_noise(8, SHAPE, STEPS)
    assert noise.shape == SHAPE and eps.shape == (STEPS - 1, *SHAPE)
    assert torch.equal(noise, again) and torch.equal(eps, eps_again) and not torch.equal(noise, other)
    generator = torch.Generator().manual_seed(7)  # the documented order: the noise, then the steps' eps
    assert torch.equal(noise, torch.randn(SHAPE, generator=generator))
    assert torch.equal(eps, torch.randn((STEPS - 1, *SHAPE), generator=generator))


def test_trajectory_follows_the_sde_with_replayed_noise():
    seeds = [3, 11]
    rollout = sample_sde(LinearField(), _context(2), steps=STEPS, noise_level=0.7, seeds=seeds, shape=SHAPE)
    times = [1 - k / STEPS for k in range(STEPS + 1)]
    for i, seed in enumerate(seeds):
        noise, eps = candidate_noise(seed, SHAPE, STEPS)
        x = noise.double()
        assert torch.equal(rollout.latents[i, 0], noise)
        for k, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            v, dt = 0.3 * x + 0.5 * t, t_next - t
            if k == STEPS - 1:  # the last step is the Euler step, no noise
                x = x + v * dt
            else:
                sigma = 0.7 * math.sqrt(t / (1 - t) if t < 1 else 1 / (1 - t_next))  # t = 1: 1 - t_next
                mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
                std = sigma * math.sqrt(-dt)
                x = mean + std * eps[k].double()
                expected_log_prob = (-eps[k].double() ** 2 / 2).mean() - math.log(std) - 0.5 * math.log(2 * math.pi)
                assert rollout.log_probs[i, k].item() == pytest.approx(expected_log_prob.item(), abs=1e-4)
            torch.testing.assert_close(rollout.latents[i, k + 1].double(), x, rtol=1e-5, atol=1e-5)
    assert rollout.log_probs.shape == (2, STEPS - 1) and rollout.steps == STEPS
    torch.testing.assert_close(rollout.timesteps, torch.tensor(times))
    assert torch.equal(rollout.videos, rollout.latents[:, -1])


def test_explicit_noises_replay_the_seeded_draws(model):
    seeded = sample_sde(model, _context(3), steps=STEPS, noise_level=0.7, seeds=[4, 5, 6], shape=SHAPE)
    drawn = [candidate_noise(seed, SHAPE, STEPS) for seed in (4, 5, 6)]
    noises = torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn])
    replayed = sample_sde(model, _context(3), steps=STEPS, noise_level=0.7, noises=noises)
    assert torch.equal(replayed.latents, seeded.latents) and replayed.seeds is None


def test_same_seeds_give_identical_rollouts(model):
    a = sample_sde(model, _context(3), steps=STEPS, noise_level=0.7, seeds=[1, 2, 3], shape=SHAPE, micro_batch=4)
    b = sample_sde(model, _context(3), steps=STEPS, noise_level=0.7, seeds=[1, 2, 3], shape=SHAPE, micro_batch=4)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    c = sample_sde(model, _context(3), steps=STEPS, noise_level=0.7, seeds=[1, 2, 4], shape=SHAPE, micro_batch=4)
    assert torch.equal(a.latents[:2], c.latents[:2]) and not torch.equal(a.latents[2], c.latents[2])


def test_a_subset_regenerated_alone_is_bit_identical_to_the_pool(model):
    seeds = [100 + i for i in range(10)]
    context = _context(10)
    pool = sample_sde(model, context, steps=STEPS, noise_level=0.7, seeds=seeds, shape=SHAPE, micro_batch=4)
    chosen = [7, 2, 9]
    alone = sample_sde(model, context[chosen], steps=STEPS, noise_level=0.7, seeds=[seeds[i] for i in chosen],
                       shape=SHAPE, micro_batch=4)  # fmt: skip
    subset = pool.select(chosen)
    assert torch.equal(alone.latents, subset.latents)
    assert torch.equal(alone.log_probs, subset.log_probs)
    assert torch.equal(alone.eps, subset.eps) and alone.seeds == subset.seeds == [107, 102, 109]
    videos = sample_sde_videos(model, context, seeds=seeds, shape=SHAPE, steps=STEPS, noise_level=0.7, micro_batch=4)
    assert torch.equal(videos, pool.videos)


def test_nvfp4_trajectories_are_close_to_full_precision_from_the_same_noise(model):
    explorer = quantize_for_rollouts(copy.deepcopy(model), "nvfp4")
    seeds, context = [5, 6, 7, 8, 9, 10], _context(6)
    full = sample_sde(model, context, steps=STEPS, noise_level=0.7, seeds=seeds, shape=SHAPE)
    fp4 = sample_sde(explorer, context, steps=STEPS, noise_level=0.7, seeds=seeds, shape=SHAPE)
    assert torch.equal(full.noise, fp4.noise) and torch.equal(full.eps, fp4.eps)
    moved = (full.videos - full.noise).norm() / full.videos.norm()
    assert moved > 0.5  # the model, not the noise, shapes the videos: the comparison below means something
    error = ((fp4.videos - full.videos).norm() / full.videos.norm()).item()
    assert 1e-4 < error < 0.1


def test_log_probs_recomputed_under_the_sampling_model_equal_the_rollouts(model):
    rollout = sample_sde(model, _context(5), steps=STEPS, noise_level=0.5, seeds=list(range(5)), shape=SHAPE,
                         micro_batch=2)  # fmt: skip
    assert torch.equal(log_probs(model, rollout), rollout.log_probs)
    assert torch.equal(log_probs(model, rollout, indices=[4, 1], steps=[2, 0]), rollout.log_probs[[4, 1]][:, [2, 0]])


def test_recomputed_log_probs_carry_gradients_to_the_policy(model):
    policy = copy.deepcopy(model).requires_grad_(True)
    rollout = sample_sde(policy, _context(2), steps=STEPS, noise_level=0.7, seeds=[1, 2], shape=SHAPE)
    log_prob, mean, std = step_log_prob(policy, rollout, 1, [0, 1])
    assert log_prob.shape == (2,) and mean.shape == (2, *SHAPE) and std.shape == (2, 1, 1, 1, 1)
    log_prob.sum().backward()
    assert policy.head.bias.grad is not None and policy.head.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stochastic step"):
        step_log_prob(policy, rollout, STEPS - 1, [0])  # the last step is deterministic


def test_sampling_rejects_bad_arguments(model):
    context = _context(2)
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        sample_sde(model, context, steps=1, noise_level=0.7, seeds=[1, 2], shape=SHAPE)
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        sample_sde(model, context, steps=STEPS, noise_level=0.0, seeds=[1, 2], shape=SHAPE)
    with pytest.raises(ValueError, match="exactly one of seeds"):
        sample_sde(model, context, steps=STEPS, noise_level=0.7)
    with pytest.raises(ValueError, match="one seed per context row"):
        sample_sde(model, context, steps=STEPS, noise_level=0.7, seeds=[1], shape=SHAPE)
    with pytest.raises(ValueError, match="noises must be"):
        noise = torch.zeros(2, *SHAPE)
        sample_sde(model, context, steps=STEPS, noise_level=0.7, noises=(noise, torch.zeros(2, STEPS, *SHAPE)))


def _select_reference(rewards: list[float], top_k: int, bottom_k: int) -> list[int]:
    top = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))[:top_k]
    rest = [i for i in range(len(rewards)) if i not in top]
    return top + sorted(rest, key=lambda i: (rewards[i], i))[:bottom_k]


@pytest.mark.parametrize("top_k, bottom_k", [(2, 2), (3, 1), (0, 4), (4, 0), (5, 5)])
def test_select_contrastive_matches_a_reference_with_ties(top_k, bottom_k):
    rewards = torch.randint(0, 4, (6, 10), generator=torch.Generator().manual_seed(top_k * 10 + bottom_k)).float()
    got = select_contrastive(rewards, top_k, bottom_k)
    assert got.shape == (6, top_k + bottom_k)
    for row, chosen in zip(rewards.tolist(), got.tolist()):
        assert chosen == _select_reference(row, top_k, bottom_k)
        assert len(set(chosen)) == len(chosen)


def test_select_contrastive_rejects_too_many():
    with pytest.raises(ValueError, match="top_k \\+ bottom_k <= N = 4"):
        select_contrastive(torch.zeros(2, 4), 3, 2)
