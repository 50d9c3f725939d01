"""Three gloo processes: S = 3 is refused at P = 2 and works at P = 3; then rank 2 dies (os._exit) before a
switch and the survivors fail with CollectiveError within the process-group timeout, never hanging."""

from __future__ import annotations

import pytest

from dist_testlib import launch

pytestmark = pytest.mark.distributed

PG_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def three():
    return launch("dist_scenarios:three_main", 3, timeout=90.0, pg_timeout=PG_TIMEOUT)


def test_survivors_exit_cleanly_and_dead_rank_is_dead(three):
    assert not three.timed_out, three.describe()
    three.assert_clean_exit(ranks=[0, 1])
    assert three.returncodes[2] == 1, three.describe([2])


def test_s_not_dividing_p_squared_is_refused(three):
    for msgs in three.check("s3_of_p2"):
        assert "S = 3 must divide P^2 = 4" in msgs["switch"]


def test_s3_at_p3_matches_single_process(three):
    three.check("s3_of_p3_perm")


def test_dead_peer_raises_collective_error(three):
    for rank, value in zip((0, 1), three.check("dead_peer", ranks=[0, 1])):
        assert value["elapsed"] < PG_TIMEOUT + 5, value
        assert value["op"] == "all_to_all_single" and value["tag"] == "ssp.switch", value
        assert value["rank"] == rank and value["world"] == 3, value
        msg = value["message"]
        assert f"rank {rank} of world size 3" in msg and "peer rank probably died" in msg, msg
        assert "Connection" in msg or "Timed out" in msg, msg  # gloo's reason (closed / reset, or a timeout)
