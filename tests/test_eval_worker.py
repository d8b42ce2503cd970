"""The evaluation stage: members evaluated a group at a time on the workers' devices, resumable, read by the report."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_ensemble.checkpoint import save_member
from sae_ensemble.config import Training
from sae_ensemble.dispatch import EXIT_OK, evaluate
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.eval_worker import MEMBERS_PER_GROUP, evaluate_members_of_run
from sae_ensemble.member import Member
from sae_ensemble.metrics import mmcs_between
from sae_ensemble.plan import make_plan
from sae_ensemble.report import load_rows
from sae_ensemble.rundir import RunDir

D_IN = 8
MEMBERS = [
    Member("relu", D_IN, size, l1=l1, seed=seed) for size in (16, 32) for l1 in (1e-3, 1e-2, 1e-1) for seed in (0, 1)
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run dir whose members trained a few steps (12 members: two groups)."""
    run_dir = tmp_path_factory.mktemp("run")
    ensemble = Ensemble(MEMBERS, 5)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ensemble.step(torch.randn(32, D_IN, generator=g))
    for i, member in enumerate(MEMBERS):
        params, _ = ensemble.member_state(i)
        save_member(
            run_dir / "members" / member.member_id,
            member,
            params,
            None,
            {"steps": 5, "tokens": 160, "metrics": {"fvu": 0.5}},
        )
    return run_dir


def expected_mmcs(run_dir) -> dict[str, dict[str, float]]:
    """MMCS with every dictionary in memory at once: what the group-by-group stage must equal."""
    decoders = {m.member_id: load_file(run_dir / "members" / m.member_id / "sae.safetensors")["W_dec"] for m in MEMBERS}
    result = {m.member_id: {} for m in MEMBERS}
    for column, pairing in (("mmcs_next", "next_size"), ("mmcs_seed", "seed")):
        for member_id, value in mmcs_between(MEMBERS, decoders, pairing=pairing).items():
            result[member_id][column] = value
    return result


def evaluations(run_dir) -> dict[str, dict]:
    files = {m.member_id: RunDir(run_dir).member(m.member_id).eval for m in MEMBERS}
    return {member_id: json.loads(path.read_text()) for member_id, path in files.items() if path.exists()}


def test_a_stopped_evaluation_resumes_without_evaluating_finished_members_again(trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    seen: list[str] = []

    def ce(hook, dirs):  # stands in for the CE evaluation: records which members it was given
        assert hook is None  # one store: members splice in at the run's hook
        seen.extend(d.name for d in dirs)
        return {d.name: {"ce_recovered": 0.5} for d in dirs}

    checks = iter([False, True])  # stop at the second group, as a SIGTERM between groups does
    ids = [m.member_id for m in MEMBERS]
    assert not evaluate_members_of_run(run_dir, ids, MEMBERS, torch.device("cpu"), ce, should_stop=lambda: next(checks))
    assert sorted(evaluations(run_dir)) == sorted(ids[:MEMBERS_PER_GROUP]) and seen == ids[:MEMBERS_PER_GROUP]

    assert evaluate_members_of_run(run_dir, ids, MEMBERS, torch.device("cpu"), ce)
    assert seen == ids  # the second run evaluated only the members the first had not
    found = evaluations(run_dir)
    for member_id, values in expected_mmcs(run_dir).items():
        assert found[member_id]["ce_loss"] is True
        assert found[member_id]["metrics"] == pytest.approx({**values, "ce_recovered": 0.5}, abs=1e-6)
    # Without CE asked, members evaluated with CE count as done.
    assert evaluate_members_of_run(run_dir, ids, MEMBERS, torch.device("cpu")) and seen == ids


def test_workers_evaluate_their_members_and_the_report_only_reads(trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    plan = make_plan(MEMBERS, ["cpu:0", "cpu:1"], 32, 2**34)
    assert len(plan.workers) == 2
    store = tmp_path / "unused-store"  # MMCS reads only the members; the store is opened for CE alone
    assert evaluate(plan, store, run_dir, Training(), progress=False) == EXIT_OK
    found, expected = evaluations(run_dir), expected_mmcs(run_dir)
    assert sorted(found) == sorted(expected)
    rows = {row["member_id"]: row for row in load_rows(run_dir)}
    for member_id, values in expected.items():
        assert found[member_id]["metrics"] == pytest.approx(values, abs=1e-6)
        assert {k: rows[member_id].get(k) for k in values} == pytest.approx(values, abs=1e-6) and rows[member_id][
            "fvu"
        ] == 0.5


def test_sigterm_during_the_evaluation_stage_exits_75_and_a_rerun_finishes_it(trained, tmp_path):
    """The dispatcher's signal path: SIGTERM once a worker exists (its handlers are installed before any) stops the
    workers at their next group with exit 75; a rerun evaluates what is left, to the values of an uninterrupted
    stage."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from sae_ensemble.dispatch import EXIT_REQUEUE

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    script = (
        f"import sys\nfrom sae_ensemble.config import Training\nfrom sae_ensemble.dispatch import evaluate\n"
        f"from sae_ensemble.member import Member\nfrom sae_ensemble.plan import make_plan\n"
        f"members = [Member.from_dict(m) for m in {[m.to_dict() for m in MEMBERS]!r}]\n"
        f"plan = make_plan(members, ['cpu:0'], 32, 2**34)\n"
        f"sys.exit(evaluate(plan, {str(tmp_path / 'no-store')!r}, {str(run_dir)!r}, Training(), progress=False))\n"
    )
    repo = Path(__file__).resolve().parents[1]

    def launch():
        return subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )

    def has_worker(pid: int) -> bool:
        for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
            try:
                if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():  # not the resource tracker
                    return True
            except FileNotFoundError:  # it exited in between
                pass
        return False

    parent = launch()
    deadline = time.monotonic() + 120
    while not has_worker(parent.pid):
        assert time.monotonic() < deadline and parent.poll() is None, parent.communicate()[0]
        time.sleep(0.05)
    parent.send_signal(signal.SIGTERM)  # the worker is still importing torch: it sees the stop before its first group
    output = parent.communicate(timeout=120)[0]
    assert parent.returncode == EXIT_REQUEUE, output
    assert "interrupted: evaluation results (eval.json) written to" in output
    assert len(evaluations(run_dir)) < len(MEMBERS)

    rerun = launch()
    output = rerun.communicate(timeout=120)[0]
    assert rerun.returncode == EXIT_OK, output
    found = evaluations(run_dir)
    for member_id, values in expected_mmcs(run_dir).items():
        assert found[member_id]["metrics"] == pytest.approx(values, abs=1e-6)


def test_decoders_are_read_only_for_the_pairs_compared(trained, monkeypatch):
    """Lazy loading: evaluating one member reads its own dictionary and its partners', never the whole run's."""
    from sae_ensemble import eval_worker

    reads = []
    real = eval_worker.Decoders.__getitem__
    monkeypatch.setattr(
        eval_worker.Decoders, "__getitem__", lambda self, member_id: (reads.append(member_id), real(self, member_id))[1]
    )
    small = MEMBERS[0]  # d16, l1 1e-3, seed 0: next size MEMBERS[6], other seed MEMBERS[1]
    decoders = eval_worker.Decoders(trained, [m.member_id for m in MEMBERS], torch.device("cpu"))
    for pairing in ("next_size", "seed"):
        mmcs_between(MEMBERS, decoders, pairing=pairing, of=[small.member_id])
    assert sorted(set(reads)) == sorted({small.member_id, MEMBERS[6].member_id, MEMBERS[1].member_id})
