"""SSP and Ulysses on 2 and 4 gloo processes equal the single-process computation (spawned once per world size;
the checks themselves are in dist_scenarios.py and compare against S = 1 references computed in each worker)."""

from __future__ import annotations

import pytest

from dist_testlib import launch

pytestmark = pytest.mark.distributed

WORLDS = (2, 4)


def world_layouts(layouts):
    """(world, layout) pairs that exist: 1D Skiparse at P = 2 allows S | 2 only."""
    return [(w, layout) for w in WORLDS for layout in layouts if layout != "1d" or w == 2]


@pytest.fixture(scope="module")
def worlds():
    """One spawned world per size, launched on first use and shared by every test of the module."""
    started = {}

    def get(size):
        if size not in started:
            started[size] = launch("dist_scenarios:world_main", size)
            started[size].assert_clean_exit()
        return started[size]

    return get


@pytest.fixture
def world(worlds, request):
    return worlds(request.param)


@pytest.mark.parametrize(("world", "layout"), world_layouts(["2d_padded", "2d_unpadded", "2d_empty", "1d"]),
                         indirect=["world"])
def test_ssp_stack_matches_single_process(world, layout):
    for value in world.check(f"ssp_stack_{layout}"):
        assert value["max_err"] <= 2e-6, value
        assert all(err == err for err in value["errs"].values()), value  # no NaN from empty sub-sequences


@pytest.mark.parametrize(("world", "layout"), world_layouts(["2d_padded", "2d_unpadded", "1d"]), indirect=["world"])
def test_ssp_permutations_bitwise(world, layout):
    world.check(f"ssp_perm_{layout}")


@pytest.mark.parametrize("world", WORLDS, indirect=True)
def test_hybrid_module_stack_matches_single_process(world):
    for err in world.check("hybrid_module_stack"):
        assert err <= 1e-5


@pytest.mark.parametrize("world", WORLDS, indirect=True)
def test_sequence_helpers(world):
    world.check("sequence_helpers")


@pytest.mark.parametrize("world", WORLDS, indirect=True)
@pytest.mark.parametrize("variant", ["dense", "skiparse"])
def test_ulysses_matches_single_process(world, variant):
    world.check(f"ulysses_{variant}")


@pytest.mark.parametrize(("world", "layout"), world_layouts(["2d_padded", "2d_unpadded", "1d"]), indirect=["world"])
def test_bytes_ssp_is_a_quarter_of_ulysses(world, layout):
    for got in world.check(f"bytes_{layout}"):
        S = world.world
        assert got["ssp_fwd"] == got["spec_unit"] and got["ssp_bwd"] == got["spec_unit"]
        assert got["ssp_calls"] == [1, 1] and got["uly_calls"] == [4, 4]
        if layout == "2d_unpadded":
            assert 4 * got["ssp_fwd"] == got["uly_fwd"] and 4 * got["ssp_bwd"] == got["uly_bwd"]
            # M = B*N'*C/S elements (B=2, N'=64, C=32, fp32): M * 4 bytes * (S-1)/S
            assert got["ssp_fwd"] == 2 * 64 * 32 // S * 4 * (S - 1) // S
        assert set(got["tags"]) == {"ssp.switch", "ssp.switch.backward", "ulysses.q", "ulysses.k", "ulysses.v",
                                    "ulysses.out", "ulysses.q.backward", "ulysses.k.backward", "ulysses.v.backward",
                                    "ulysses.out.backward"}


@pytest.mark.parametrize("world", WORLDS, indirect=True)
def test_bad_inputs_raise_before_communicating(world):
    for msgs in world.check("bad_inputs"):
        assert "N = " in msgs["shard N % S"]


@pytest.mark.parametrize("world", [4], indirect=True)
def test_subgroups(world):
    world.check("subgroup_ssp_stack")
    world.check("subgroup_ssp_perm")
    world.check("s3_of_p2", ranks=[0, 1, 2])


@pytest.mark.parametrize("world", [2], indirect=True)
def test_absent_peer_times_out_with_collective_error(world):
    (value,) = world.check("timeout", ranks=[0])
    assert value["elapsed"] < 15, value
    assert value["op"] == "all_to_all_single" and value["tag"] == "ssp.switch"
    assert "rank 0 of world size 2" in value["message"], value
    assert "Timed out" in value["message"], value  # the backend's own reason is carried in the message
