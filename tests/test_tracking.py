"""wandb offline: one run per member, its config holds the member's hyperparameters.

wandb 0.31 writes `files/config.yaml` only when it syncs (online), so offline runs are
checked through what wandb itself recorded: the run's transaction log `run-<id>.wandb`
(LevelDB-style log of `wandb.proto` Records), read here with a few lines of parsing.
"""

import json
import struct
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from sae_ensemble.member import Member
from sae_ensemble.tracking import Tracker, run_id

BLOCK = 32768
HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version


def read_records(path: Path) -> list:
    """Every protobuf Record in a .wandb transaction log (32 KiB blocks of CRC/len/type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk completes a record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_record(run_dir: Path):
    (log,) = run_dir.glob("run-*.wandb")
    records = read_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return run, config, history


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


MEMBERS = [
    Member("relu", 8, 16, l1=1e-3, seed=0),
    Member("relu", 8, 32, l1=3e-3, lr=2e-3, seed=1),
    Member("topk", 8, 16, k=4),
    # the architectures' own hyperparameters reach the run config too
    Member("jumprelu", 8, 16, l0_coefficient=1e-3, threshold=0.05, bandwidth=0.1),
    Member("matryoshka", 8, 16, k=2, matryoshka_widths=(4,), auxk_dead_tokens=100),
]
BASE = {"data": {"store": "/stores/x", "normalize": "none"}, "model": "tiny", "hook": "blocks.0.hook_resid_pre"}


def test_each_member_gets_its_own_offline_run_holding_its_hyperparameters(offline_env):
    tracker = Tracker("proj", "sweep-a", base_config=BASE, directory=offline_env / "runs")
    assert tracker.mode == "offline"  # no key in the environment
    tracker.register(MEMBERS)
    for step in range(3):
        for member in MEMBERS:
            tracker.log(member.member_id, step, {"mse": 0.1 * step, "l0": 3.0})
    for member in MEMBERS:
        tracker.finish(member.member_id, {"fvu": 0.25})
    tracker.close()

    run_dirs = sorted((offline_env / "runs" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == len(MEMBERS)
    by_id = {run_record(d)[0].run_id: d for d in run_dirs}
    for member in MEMBERS:
        run, config, history = run_record(by_id[run_id("sweep-a", member.member_id, offline_env / "runs")])
        assert (run.display_name, run.run_group, run.job_type) == (member.member_id, "sweep-a", member.variant)
        for name, value in member.to_dict().items():
            assert config[name] == value, name
        assert config["data"] == BASE["data"] and config["hook"] == BASE["hook"]
        assert [h["mse"] for h in history] == pytest.approx([0.0, 0.1, 0.2])


def test_run_ids_are_stable_so_a_resumed_sweep_continues_the_same_runs(offline_env):
    member = MEMBERS[0]
    for _ in range(2):
        with Tracker("proj", "sweep-b", mode="offline", directory=offline_env / "runs") as tracker:
            tracker.register([member])
            tracker.log(member.member_id, 0, {"mse": 1.0})
    run_dirs = list((offline_env / "runs" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2  # offline, each session writes its own log; `wandb sync` merges them into one run
    assert {run_record(d)[0].run_id for d in run_dirs} == {run_id("sweep-b", member.member_id, offline_env / "runs")}
    assert run_id("sweep-b", member.member_id, offline_env / "runs") != run_id(
        "sweep-c", member.member_id, offline_env / "runs"
    )
    # Another job of the same sweep (another run dir) never writes into these runs.
    assert run_id("sweep-b", member.member_id, offline_env / "runs") != run_id(
        "sweep-b", member.member_id, offline_env / "job1"
    )


def test_sweep_plots_go_to_one_sweep_run(offline_env):
    plot = offline_env / "pareto.png"
    plt.plot([0, 1], [1, 0])
    plt.savefig(plot)
    plt.close()
    with Tracker("proj", "sweep-d", base_config=BASE, directory=offline_env / "runs") as tracker:
        tracker.log_sweep_plots([plot])
    (run_dir,) = (offline_env / "runs" / "wandb").glob("offline-run-*")
    run, config, history = run_record(run_dir)
    assert run.job_type == "sweep" and run.run_group == "sweep-d"
    assert history[0]["pareto/_type"] == "image-file"
    assert list((run_dir / "files" / "media" / "images").glob("pareto*.png"))


def test_disabled_mode_writes_nothing_and_unknown_members_are_named(offline_env):
    with Tracker("proj", "sweep-e", mode="disabled", directory=offline_env / "runs") as tracker:
        tracker.log("anything", 0, {"mse": 1.0})
        tracker.finish("anything", {"mse": 1.0})
    assert not (offline_env / "runs").exists()
    with pytest.raises(ValueError, match="never registered"):
        Tracker("proj", "g", mode="offline", directory=offline_env / "runs").log("ghost", 0, {})
    with pytest.raises(ValueError, match="mode='cloud'"):
        Tracker("proj", "g", mode="cloud")


def test_a_key_without_network_falls_back_to_offline_and_the_key_is_written_nowhere(offline_env, monkeypatch):
    import wandb

    key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", key)
    real_init = wandb.init

    def init_without_network(*args, mode=None, **kwargs):
        if mode == "online":
            raise wandb.errors.CommError("no route to host")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init_without_network)
    tracker = Tracker("proj", "sweep-f", directory=offline_env / "runs")
    assert tracker.mode == "online"  # a key is set
    tracker.register(MEMBERS[:1])
    with pytest.warns(UserWarning, match="offline"):
        tracker.log(MEMBERS[0].member_id, 0, {"mse": 1.0})
        tracker.flush()  # runs open in the tracker's background thread
    tracker.close()
    assert tracker.mode == "offline"
    assert len(list((offline_env / "runs" / "wandb").glob("offline-run-*"))) == 1
    files = [p for p in (offline_env / "runs").rglob("*") if p.is_file()]
    assert files and not any(key.encode() in p.read_bytes() for p in files)
