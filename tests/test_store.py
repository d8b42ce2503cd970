"""The activation store: round trips, shuffling, resume, held-out split, zero copy, bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sae_ensemble.activations.format import StoreError, write_chunk_file
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.activations.stream import Position, train_batches
from sae_ensemble.activations.writer import ChunkWriter
from sae_ensemble.config import ConfigError, Grid, SweepConfig, SyntheticData, Training, validate

D_IN = 8


def write_store(path, x, dtype="float32", rows_per_chunk=64, heldout_rows=None, write_sizes=(37,)):
    """Write rows x [n, d] in uneven batch sizes; return the opened store."""
    writer = ChunkWriter(
        path, x.shape[1], dtype, rows_per_chunk, source={"kind": "test"}, hook="h", heldout_rows=heldout_rows
    )
    start, i = 0, 0
    while start < len(x):
        step = write_sizes[i % len(write_sizes)]
        writer.write(x[start : start + step])
        start, i = start + step, i + 1
    return writer.close()


@pytest.fixture
def rows():
    # integer-valued rows: row r is [r, r, ...] + column offset, exactly representable in bf16 up to 256
    n = 200
    return torch.arange(n, dtype=torch.float32)[:, None] + torch.zeros(n, D_IN)


@pytest.fixture
def store(tmp_path, rows):
    return write_store(tmp_path / "s", rows, heldout_rows=20)


def row_ids(batch):
    return batch[:, 0].long().tolist()


# ---- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_write_then_read_returns_identical_rows(tmp_path, dtype):
    x = torch.randn(300, D_IN)
    store = write_store(tmp_path / "s", x, dtype=dtype, write_sizes=(1, 50, 7, 130))
    expected = x.to(getattr(torch, dtype)).float()
    assert store.n_rows == 300 and store.d_in == D_IN and store.manifest["n_chunks"] == 5
    assert torch.equal(store.rows(np.arange(300)), expected)
    assert torch.equal(store.rows(np.array([299, 3, 150, 3])), expected[[299, 3, 150, 3]])
    # chunks are ordinary safetensors files
    with safe_open(str(tmp_path / "s" / "chunk_00001.safetensors"), "pt") as f:
        assert list(f.keys()) == ["activations"]
        assert torch.equal(f.get_tensor("activations").float(), expected[64:128])


def test_manifest_records_mean_norm_and_checksums(store, rows):
    m = store.manifest
    assert np.allclose(m["mean"], rows.mean(0).numpy())
    assert m["mean_norm"] == pytest.approx(rows.norm(dim=1).mean().item(), rel=1e-6)
    assert m["heldout_rows"] == 20 and store.n_train_rows == 180
    assert all(len(c["sha256"]) == 64 for c in m["chunks"])
    assert not (store.path / "progress.json").exists()
    ActivationStore.open(store.path, verify="checksum")


def test_default_heldout_is_ten_percent(tmp_path, rows):
    assert write_store(tmp_path / "s", rows).heldout_rows == 20


# ---- shuffled training stream --------------------------------------------------------------------


def take(store, n, **kwargs):
    it = train_batches(store, kwargs.pop("batch_size", 20), **kwargs)
    return [next(it) for _ in range(n)]


def test_one_epoch_is_a_permutation_of_the_training_rows(store):
    batches = take(store, 9, seed=0, window=2)  # 180 training rows / 20
    ids = [i for b, _ in batches for i in row_ids(b)]
    training = sorted(set(range(200)) - set(store.heldout_indices().tolist()))
    assert sorted(ids) == training
    assert ids != training
    assert batches[-1][1] == Position(1, 0, 0)


def test_same_seed_same_order_other_seed_other_order(store):
    a = [row_ids(b) for b, _ in take(store, 12, seed=3)]
    b = [row_ids(b) for b, _ in take(store, 12, seed=3)]
    c = [row_ids(b) for b, _ in take(store, 12, seed=4)]
    assert a == b and a != c
    assert a[:9] != a[9:] + a[:6]  # epochs differ from each other, too


def test_drop_last_skips_the_remainder_of_each_epoch(store):
    batches = take(store, 3, seed=0, batch_size=50)  # 180 // 50 = 3 batches, 30 rows dropped
    assert len({i for b, _ in batches for i in row_ids(b)}) == 150
    assert batches[-1][1] == Position(1, 0, 0)


def test_the_shuffle_window_mixes_that_many_chunks_and_is_a_checked_training_setting(tmp_path):
    writer = ChunkWriter(tmp_path / "s", 2, "float32", 100, source={"kind": "test"}, heldout_rows=100)
    writer.write(torch.arange(1100, dtype=torch.float32)[:, None].repeat(1, 2))  # row r holds r: its chunk is r // 100
    store = writer.close()

    def chunks_per_batch(window: int) -> float:
        stream = train_batches(store, 50, seed=0, window=window)
        return float(np.mean([len(set((next(stream)[0][:, 0] // 100).long().tolist())) for _ in range(20)]))

    # one chunk at a time (a batch spans at most the two chunks at a window's edge) vs mixing eight
    assert chunks_per_batch(1) <= 2 and chunks_per_batch(8) > 5
    cfg = SweepConfig(data=SyntheticData(), grid=Grid(dict_sizes=[64]), training=Training(shuffle_window_chunks=0))
    with pytest.raises(ConfigError, match="training.shuffle_window_chunks=0 must be at least 1"):
        validate(cfg)


@pytest.mark.parametrize("stop", [1, 4, 8, 9, 13])
def test_restart_from_next_position_reproduces_the_rest(store, stop):
    full = take(store, 20, seed=7, window=2)
    position = Position.from_dict(json.loads(json.dumps(full[stop - 1][1].to_dict())))
    it = train_batches(store, 20, seed=7, window=2, position=position)
    rest = [next(it) for _ in range(20 - stop)]
    for (a, pa), (b, pb) in zip(full[stop:], rest):
        assert torch.equal(a, b) and pa == pb


def test_position_from_another_batch_size_is_rejected(store):
    _, position = take(store, 2, seed=0, batch_size=20, window=1)[-1]  # batch 2 starts at row 40: window 0
    with pytest.raises(StoreError, match="batch_size"):
        next(train_batches(store, 50, seed=0, window=1, position=position))  # row 100: window 1
    with pytest.raises(StoreError, match=r"batch=5 is outside \[0, 3\)"):
        next(train_batches(store, 50, seed=0, position=Position(0, 0, 5)))


def test_heldout_rows_are_every_chunks_tail_and_never_appear_in_training(store):
    # chunks of 64, 64, 64 and 8 rows; 20 held out in proportion: 6, 6, 7 and 1 from their ends
    tails = [range(58, 64), range(122, 128), range(185, 192), range(199, 200)]
    held = set(row_ids(store.heldout()))
    assert held == {r for tail in tails for r in tail}
    trained = {i for b, _ in take(store, 30, seed=1) for i in row_ids(b)}
    assert trained == set(range(200)) - held
    # a prefix of the held-out rows samples every chunk's tail, not the first chunk's alone
    assert row_ids(store.heldout(max_rows=4)) == [58, 122, 185, 199]


def test_format_1_store_keeps_its_heldout_split_at_the_end(store):
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["format_version"] = 1
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    old = ActivationStore.open(store.path)
    assert set(row_ids(old.heldout())) == set(range(180, 200))
    assert {i for b, _ in take(old, 30, seed=1) for i in row_ids(b)} == set(range(180))
    assert old.fingerprint != store.fingerprint  # a run trained on one split never resumes on the other


def test_normalize_center_scale_gives_zero_mean_and_unit_rms(tmp_path):
    x = 3 + 5 * torch.randn(4000, D_IN)
    store = write_store(tmp_path / "s", x, rows_per_chunk=1000, heldout_rows=1)
    batch = torch.cat([b for b, _ in take(store, 3, seed=0, batch_size=1333, normalize="center_scale")])
    assert batch.mean(0).abs().max() < 0.1
    assert batch.square().sum(1).mean() == pytest.approx(D_IN, rel=0.05)


def test_fingerprint_follows_content(tmp_path, rows):
    a = write_store(tmp_path / "a", rows).fingerprint
    assert a == write_store(tmp_path / "b", rows).fingerprint
    assert a != write_store(tmp_path / "c", rows + 1).fingerprint


# ---- resumable writing -----------------------------------------------------------------------------


def test_interrupted_writer_resumes_from_last_complete_chunk(tmp_path, rows, monkeypatch):
    calls = []
    real = ChunkWriter._write_chunk

    def fail_on_third(self, path, data):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, path, data)

    monkeypatch.setattr(ChunkWriter, "_write_chunk", fail_on_third)
    writer = ChunkWriter(tmp_path / "s", D_IN, "float32", 64, source={"kind": "test"}, hook="h", heldout_rows=20)
    with pytest.raises(KeyboardInterrupt):
        for start in range(0, 200, 10):
            writer.write(rows[start : start + 10])
    monkeypatch.setattr(ChunkWriter, "_write_chunk", real)
    with pytest.raises(StoreError, match="incomplete.*resume"):
        ActivationStore.open(tmp_path / "s")

    writer = ChunkWriter(tmp_path / "s", D_IN, "float32", 64, source={"kind": "test"}, hook="h", heldout_rows=20)
    assert writer.resume_rows == 128
    writer.write(rows[writer.resume_rows :])
    store = writer.close()
    assert torch.equal(store.rows(np.arange(200)), rows)
    assert store.manifest == {
        **write_store(tmp_path / "ref", rows, heldout_rows=20).manifest,
        "created_at": store.manifest["created_at"],
    }


def test_resuming_with_other_parameters_is_refused(tmp_path, rows):
    writer = ChunkWriter(tmp_path / "s", D_IN, "float32", 64)
    writer.write(rows[:100])
    with pytest.raises(StoreError, match="different parameters"):
        ChunkWriter(tmp_path / "s", D_IN, "float16", 64)


# ---- bad input ------------------------------------------------------------------------------------


def corrupt(path: Path, how: str):
    chunk = path / "chunk_00001.safetensors"
    manifest = path / "manifest.json"
    if how == "missing chunk":
        chunk.unlink()
    elif how == "truncated chunk":
        chunk.write_bytes(chunk.read_bytes()[:-16])
    elif how == "flipped byte":
        data = bytearray(chunk.read_bytes())
        data[-1] ^= 0xFF
        chunk.write_bytes(bytes(data))
    elif how == "manifest d_in":
        m = json.loads(manifest.read_text())
        m["d_in"], m["mean"] = D_IN * 2, m["mean"] * 2
        manifest.write_text(json.dumps(m))
    elif how == "chunk d_in":  # a chunk of the right byte size but shape [rows / 2, 2 * d_in]
        m = json.loads(manifest.read_text())
        x = np.zeros((32, 2 * D_IN), np.float32)
        m["chunks"][1]["bytes"], _ = write_chunk_file(chunk, x, "float32")
        manifest.write_text(json.dumps(m))
    elif how == "missing manifest":
        manifest.unlink()
    elif how == "bad manifest":
        manifest.write_text("{not json")


@pytest.mark.parametrize(
    "how, verify, message",
    [
        ("missing chunk", "size", r"chunk_00001\.safetensors listed in the manifest is missing"),
        ("truncated chunk", "size", r"chunk_00001\.safetensors has \d+ bytes but the manifest says \d+"),
        ("flipped byte", "checksum", r"chunk_00001\.safetensors has sha256 .* corrupt"),
        ("manifest d_in", "size", r"chunk_00000\.safetensors has shape \[64, 8\] but the manifest says \[64, 16\]"),
        ("chunk d_in", "size", r"chunk_00001\.safetensors has shape \[32, 16\] but the manifest says \[64, 8\]"),
        ("missing manifest", "size", r"incomplete or not a store: it has no manifest\.json"),
        ("bad manifest", "size", r"manifest\.json is not valid JSON"),
    ],
)
def test_bad_store_raises_store_error_naming_the_file(store, how, verify, message):
    ActivationStore.open(store.path, verify=verify)  # fine before
    corrupt(store.path, how)
    with pytest.raises(StoreError, match=message) as info:
        ActivationStore.open(store.path, verify=verify)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_flipped_byte_passes_size_check_but_not_checksum(store):
    corrupt(store.path, "flipped byte")
    ActivationStore.open(store.path, verify="size")
    with pytest.raises(StoreError):
        ActivationStore.open(store.path, verify="checksum")


def test_a_store_path_that_is_a_file_or_missing_is_refused_naming_it(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match=r"/f is a file"):
        ActivationStore.open(tmp_path / "f")
    with pytest.raises(StoreError, match=r"/f is a file"):
        ChunkWriter(tmp_path / "f", D_IN)
    with pytest.raises(StoreError, match=r"/nope does not exist"):
        ActivationStore.open(tmp_path / "nope")


def test_the_writer_refuses_a_bad_dtype_a_wrong_width_and_an_empty_store(tmp_path):
    with pytest.raises(StoreError, match="'float64' is not supported"):
        ChunkWriter(tmp_path / "s", D_IN, "float64")
    writer = ChunkWriter(tmp_path / "s", D_IN)
    with pytest.raises(StoreError, match=r"shape \[n, 8\], got \[3, 9\]"):
        writer.write(torch.zeros(3, 9))
    with pytest.raises(StoreError, match="received no rows"):
        writer.close()


# ---- zero copy ------------------------------------------------------------------------------------

READER = textwrap.dedent(
    """
    import json, sys, psutil
    from sae_ensemble.activations.reader import ActivationStore
    from sae_ensemble.activations.stream import train_batches

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024

    process = psutil.Process()
    store = ActivationStore.open(sys.argv[1])
    batches = train_batches(store, 4096, seed=0)
    next(batches)  # warm up: imports, first allocations
    uss, rss_anon = process.memory_full_info().uss, anon()
    n_rows = 0
    for _ in range(store.batches_per_epoch(4096) - 1):
        batch, _ = next(batches)
        n_rows += len(batch)
    print(json.dumps({"uss": process.memory_full_info().uss - uss, "anon": anon() - rss_anon, "rows": n_rows}))
    """
)


@pytest.mark.memory
def test_second_process_reads_whole_store_without_private_copy(tmp_path):
    d_in, n_rows = 256, 220_000  # 225 MB of float32
    writer = ChunkWriter(tmp_path / "big", d_in, "float32", 32_768, heldout_rows=4096)
    generator = torch.Generator().manual_seed(0)
    for _ in range(0, n_rows, 20_000):
        writer.write(torch.randn(20_000, d_in, generator=generator))
    store = writer.close()
    store_bytes = sum(c["bytes"] for c in store.manifest["chunks"])
    # this process maps every chunk too (like a second worker), so page-cache pages are shared
    # and count in neither process's USS unless someone makes a private copy
    chunks = [store._chunk(c) for c in range(store.manifest["n_chunks"])]
    assert all(np.isfinite(chunk.sum()) for chunk in chunks)  # sum() reads every page, copies none
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        # glibc otherwise keeps freed 4 MB batch buffers in its heap (bounded allocator caching,
        # not a copy of the store); a fixed mmap threshold returns them, isolating what we measure
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    out = subprocess.run(
        [sys.executable, "-c", READER, str(store.path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    grown = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"reading a {store_bytes / 2**20:.0f} MiB store grew USS by {grown['uss'] / 2**20:.1f} MiB, "
        f"RssAnon by {grown['anon'] / 2**20:.1f} MiB"
    )
    assert grown["rows"] == (store.n_train_rows // 4096 - 1) * 4096
    assert grown["uss"] < 0.25 * store_bytes, grown
    assert grown["anon"] < 0.25 * store_bytes, grown
