"""Built-in rewards (difforge.rl.rewards) on hand-drawn videos, and the plug-in interface."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from difforge.rl.rewards import REWARDS, get_reward

BACKGROUND = -0.75  # the synthetic data's dark background level
RED, BLUE = (1.0, -1.0, -1.0), (-1.0, -1.0, 1.0)  # RGB in [-1, 1]


def square_video(colour, velocity, *, start=(8.0, 8.0), frames=5, size=16, radius=2, channels=4):
    """[1, C, T, H, W]: a square of ``colour`` whose centre starts at ``start`` (row, col) and moves by
    ``velocity`` (rows, cols) per frame, wrapping around the frame, on a uniform dark background."""
    video = torch.full((1, channels, frames, size, size), BACKGROUND)
    for f in range(frames):
        cy, cx = round(start[0] + f * velocity[0]), round(start[1] + f * velocity[1])
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                for c in range(3):
                    video[0, c, f, (cy + dy) % size, (cx + dx) % size] = colour[c]
    return video


def test_colour_and_motion_rank_a_red_square_moving_east_above_a_blue_one_moving_west():
    red_east = square_video(RED, (0, 1))
    blue_west = square_video(BLUE, (0, -1))
    both = torch.cat([red_east, blue_west])
    red, blue = REWARDS["colour:red"](both, None), REWARDS["colour:blue"](both, None)
    assert red[0] > red[1] and blue[1] > blue[0]
    assert red[0] > -0.05 and blue[1] > -0.05  # the foreground colour is found almost exactly
    east, west = REWARDS["motion:east"](both, None), REWARDS["motion:west"](both, None)
    torch.testing.assert_close(east, torch.tensor([1.0, -1.0]), atol=1e-4, rtol=0)  # pixels per frame
    torch.testing.assert_close(west, torch.tensor([-1.0, 1.0]), atol=1e-4, rtol=0)
    conditions = [{"direction": 2}, {"direction": 2}]  # both prompts asked for east
    torch.testing.assert_close(REWARDS["prompt_motion"](both, conditions), east)


@pytest.mark.parametrize(
    "name, velocity, expected",
    [("motion:north", (-1, 0), 1.0), ("motion:south", (-1, 0), -1.0), ("motion:northeast", (-1, 1), 2**0.5),
     ("motion:southwest", (2, -2), 8**0.5), ("motion:east", (-1, 0), 0.0)],
)  # fmt: skip
def test_motion_is_the_displacement_along_the_direction(name, velocity, expected):
    video = square_video((1.0, 1.0, 0.0), velocity)
    assert REWARDS[name](video, None).item() == pytest.approx(expected, abs=1e-4)


def test_motion_follows_a_shape_across_the_wrapping_edge():
    video = square_video(RED, (0, 2), start=(5.0, 13.0), frames=4)  # columns 13, 15, 1, 3: wraps after frame 1
    assert REWARDS["motion:east"](video, None).item() == pytest.approx(2.0, abs=1e-4)
    assert REWARDS["motion:south"](video, None).item() == pytest.approx(0.0, abs=1e-4)


def test_prompt_motion_reads_each_condition_and_checks_them():
    video = torch.cat([square_video(RED, (0, 1)), square_video(RED, (0, 1))])
    got = REWARDS["prompt_motion"](video, [{"direction": 6}, {"direction": 2}])  # west, east
    torch.testing.assert_close(got, torch.tensor([-1.0, 1.0]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="one condition per video"):
        REWARDS["prompt_motion"](video, [{"direction": 2}])
    with pytest.raises(ValueError, match="0..7"):
        REWARDS["prompt_motion"](video, [{"direction": 2}, {"direction": 9}])


def test_colour_rises_as_the_shape_turns_towards_the_colour():
    scores = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        colour = tuple(alpha * r + (1 - alpha) * b for r, b in zip(RED, BLUE))
        scores.append(REWARDS["colour:red"](square_video(colour, (1, 0)), None).item())
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] > -0.05 and scores[0] < -2.5  # red vs blue: distance 2 sqrt(2) in [-1, 1] RGB


def test_brightness_is_mean_luminance_mapped_to_unit_interval():
    levels = [-1.0, -0.5, 0.0, 0.5, 1.0, 3.0]  # 3 is clamped to 1
    videos = torch.stack([torch.full((4, 2, 4, 4), v) for v in levels])
    expected = torch.tensor([(min(v, 1.0) + 1) / 2 for v in levels])
    torch.testing.assert_close(REWARDS["brightness"](videos, None), expected)
    coloured = torch.zeros(1, 3, 1, 2, 2)
    coloured[0, 0], coloured[0, 1], coloured[0, 2] = 1.0, -1.0, 0.5  # R, G, B
    expected = (0.299 * 1.0 + 0.587 * -1.0 + 0.114 * 0.5 + 1) / 2
    assert REWARDS["brightness"](coloured, None).item() == pytest.approx(expected, abs=1e-6)


def test_rewards_reject_videos_without_rgb():
    with pytest.raises(ValueError, match=r"\[B, C >= 3, T, H, W\]"):
        REWARDS["brightness"](torch.zeros(2, 2, 3, 4, 4), None)


def test_get_reward_resolves_builtins_and_a_callable_and_checks_the_output():
    video = square_video(RED, (0, 1))
    assert get_reward("colour:red")(video).item() == REWARDS["colour:red"](video, None).item()
    mean_red = get_reward(lambda videos, conditions: videos[:, 0].mean(dim=(1, 2, 3)))
    assert mean_red(video).item() == pytest.approx(video[0, 0].mean().item())
    with pytest.raises(ValueError, match=r"shape \[B=1\]"):
        get_reward(lambda videos, conditions: videos.mean())(video)
    with pytest.raises(ValueError, match="non-finite"):
        get_reward(lambda videos, conditions: torch.full((1,), float("nan")))(video)


def test_get_reward_imports_a_module_function_plugin(tmp_path, monkeypatch):
    (tmp_path / "rl_reward_plugin_for_tests.py").write_text(textwrap.dedent("""
        def green_level(videos, conditions):
            return videos[:, 1].mean(dim=(1, 2, 3)) + len(conditions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rl_reward_plugin_for_tests", raising=False)
    reward = get_reward("rl_reward_plugin_for_tests:green_level")
    video = torch.full((2, 4, 2, 4, 4), 0.25)
    torch.testing.assert_close(reward(video, [{}, {}]), torch.tensor([2.25, 2.25]))
    with pytest.raises(ValueError, match="no callable 'missing'"):
        get_reward("rl_reward_plugin_for_tests:missing")


@pytest.mark.parametrize("name", ["sharpness", "colour:purple", "motion:up", "no_such_module_xyz:reward"])
def test_unknown_rewards_list_the_builtins(name):
    with pytest.raises(ValueError, match="built-ins: brightness, colour:red.*prompt_motion"):
        get_reward(name)
