"""benchmarks/peers.py: each peer library's own training loop really trains the grid we compare against, on our rows.

Each peer runs in its own venv (`make interop`), as in tests/test_interop.py: without one these tests skip, and with
SAE_REQUIRE_INTEROP=1 (CI) they fail instead.
"""

import pytest

from benchmarks import peers
from tests.test_interop import library_python

RUNS = [
    ("saelens", "dense"),
    ("saelens", "topk"),
    ("dictionary_learning", "dense"),
    ("dictionary_learning", "topk"),
    ("sparsify", "topk"),
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Each tiny case's rows, written once: row block i is batch i for every side."""
    return {name: peers.write_rows(case, tmp_path_factory.mktemp(name)) for name, case in peers.TINY.items()}


@pytest.mark.parametrize("peer,case", RUNS, ids=[f"{p}-{c}" for p, c in RUNS])
def test_each_peers_own_loop_trains_every_member_of_the_tiny_grid(rows, tmp_path, peer, case):
    library_python(peer)
    out = peers.train_peer(peer, case, peers.TINY[case], *rows[case], "cpu", 1, tmp_path)
    assert out["supported"] and out["threads"] == 1
    assert sorted(out["members"]) == sorted(m["member_id"] for m in peers.TINY[case].members)
    for member_id, member in out["members"].items():
        assert member["loss_last"] < member["loss_first"], (peer, member_id, member)
        assert member["weights_changed"], (peer, member_id)
        assert 0 < member["fvu"] < 1.5 and member["l0"] > 0, (peer, member_id, member)


def test_a_peer_that_cannot_train_a_case_says_so_and_gets_no_numbers(rows, tmp_path):
    library_python("sparsify")
    out = peers.train_peer("sparsify", "dense", peers.TINY["dense"], *rows["dense"], "cpu", 1, tmp_path)
    assert out["supported"] is False and "ReLU" in out["reason"] and not out["members"]
    line = peers.compare("dense", peers.TINY["dense"], "cpu", 1, {}, out)
    assert line["supported"] is False and "speedup" not in line and line["reason"] == out["reason"]


def test_our_side_trains_the_same_members_on_the_same_rows_and_the_line_compares_them(rows):
    case = peers.TINY["topk"]
    ours = peers.train_ours(case, *rows["topk"], "cpu", 1)
    assert sorted(ours["members"]) == sorted(m["member_id"] for m in case.members) and ours["seconds"] > 0
    fake_peer = {
        "peer": "p",
        "supported": True,
        "train_seconds": 2 * ours["seconds"],
        "threads": 1,
        "members": {
            k: {**v, "loss_first": 2.0, "loss_last": 1.0, "weights_changed": True} for k, v in ours["members"].items()
        },
    }
    line = peers.compare("topk", case, "cpu", 1, ours, fake_peer)
    assert line["speedup"] == 2.0 and line["quality"]["fvu_ratio"] == 1.0 and line["peer_trained"]
    assert line["threads"] == {"ours": 1, "peer": 1} and "same order" in line["rows"]


OUR_RUNS = RUNS + [("saelens", "batchtopk"), ("dictionary_learning", "batchtopk")]


@pytest.mark.parametrize("peer,case", OUR_RUNS, ids=[f"{p}-{c}" for p, c in OUR_RUNS])
def test_our_side_trains_each_case_with_the_settings_each_peer_fixes(rows, peer, case):
    """Every case the benchmark runs, with what `peer_fixed` gives our members against that peer (clipping, the
    encoder's initial norm, learned decoder norms): each trains (no peer venv needed)."""
    spec = peers.TINY[case]
    ours = peers.train_ours(spec, *rows[case], "cpu", 1, peers.peer_fixed(peer, spec.architecture, spec.d_in))
    assert sorted(ours["members"]) == sorted(m["member_id"] for m in spec.members)
    assert all(0 < member["fvu"] < 1.5 for member in ours["members"].values()), ours["members"]


def test_repeated_runs_give_each_sides_median_seconds_and_keep_every_runs():
    runs = [{"seconds": 3.0, "members": {"a": 1}}, {"seconds": 1.0, "members": {"a": 2}}, {"seconds": 2.0}]
    median = peers.median_run(runs, "seconds")
    assert median["seconds"] == 2.0 and median["seconds_each"] == [3.0, 1.0, 2.0] and median["members"] == {"a": 1}
    unsupported = {"supported": False, "train_seconds": None, "reason": "no"}
    assert peers.median_run([unsupported], "train_seconds") == unsupported and peers.median_run([], "seconds") == {}
