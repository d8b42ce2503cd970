"""Side by side with the tools researchers use now: the same grid of SAEs trained by our ensemble and by
SAELens, dictionary_learning and sparsify, on the same rows, in the same order, with the same threads.

    python -m benchmarks.peers                                 # the CPU cases, every peer (make bench-peers)
    python -m benchmarks.peers --cases dense --peers saelens
    python -m benchmarks.peers --device cuda                   # on a GPU: the small and the GPU-sized cases
    python -m benchmarks.peers --tiny                          # 20 steps at toy sizes: does every side train?

Per case, the rows are a synthetic ground-truth store's (our generator), read once in training order: row
block i is batch i for every side, and nobody shuffles. Then the grid trains
- our way, as a sweep worker runs it: the planner packs the members into ensembles (one per dict size), each
  ensemble's autotuner picks its execution on the first batch, and the ensembles step one after another on
  every batch (a worker's stage);
- each peer's way, with its own training loop in its own venv (`make interop`), one SAE after another
  (tests/interop/peers/: the runners, what each library is given and the hyperparameter conversions).
A peer that cannot train a case (sparsify has no ReLU/L1 SAE) says so; it gets no row of numbers.
Where a peer fixes a setting no user can change (the encoder's initial norm: dictionary_learning's ReLU SAE 0.1,
sparsify about 0.58; gradient clipping: SAELens and dictionary_learning at 1.0 of their loss; SAELens' TopK
decoder rows, free, their norms scaling the pre-activations), our members take the same (`encoder_init_norm`,
`max_grad_norm`, `learned_decoder_norm`: `peer_fixed`), so both sides train the same SAEs.

One JSON line per (case, peer): the seconds of training the whole grid for each side, `speedup` = peer_s /
ours_s, and the quality each side reached on the same held-out rows (mean FVU and L0; `fvu_ratio` = ours /
peer, so speed bought with worse SAEs shows). The timed spans are training only: neither side's process
start, imports, data loading or held-out evaluation is in them. `--repeats N` trains each side N times,
alternately, and takes each side's median seconds (every run's are in `seconds_each`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_ensemble.activations.stream import train_batches
from sae_ensemble.activations.synthetic import write_synthetic
from sae_ensemble.config import ExecutionKind
from sae_ensemble.devices import cpu_threads, torch_device
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.member import Member
from sae_ensemble.memory import resolve_budget, reuse_freed_memory
from sae_ensemble.metrics import heldout_metrics
from sae_ensemble.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
PEERS = ("saelens", "dictionary_learning", "sparsify")
HELDOUT_ROWS = 4096
FREEZE_AFTER = 10  # training.freeze_after's default


@dataclass(frozen=True)
class Case:
    """A grid: `members` are the peer spec's member dicts (member_id, dict_size, lr, seed, l1 | k | ...)."""

    architecture: str
    d_in: int
    batch_size: int
    steps: int
    members: list[dict] = field(default_factory=list)
    gpu_only: bool = False


def _relu_grid(sizes: list[int], l1s: list[float], lr: float) -> list[dict]:
    return [
        {"member_id": f"relu-d{n}-l1_{l1:.3g}", "dict_size": n, "l1": l1, "lr": lr, "seed": 0}
        for n in sizes
        for l1 in l1s
    ]


def _k_grid(architecture: str, size: int, k: int, lrs: list[float], dead_tokens: int) -> list[dict]:
    return [
        {
            "member_id": f"{architecture}-d{size}-k{k}-lr{lr:g}-s{seed}",
            "dict_size": size,
            "k": k,
            "lr": lr,
            "seed": seed,
            "auxk": True,
            "auxk_dead_tokens": dead_tokens,
        }
        for lr in lrs
        for seed in (0, 1)
    ]


L1S = [round(10 ** (-4 + j / 7), 7) for j in range(8)]  # 1e-4 .. 1e-3: L0 from many features to a few (FVU < 1)
CASES = {
    # The three grids at a size a 2-core CPU trains in a few minutes ...
    "dense": Case("relu", 128, 512, 300, _relu_grid([256, 512], L1S, 3e-3)),
    "topk": Case("topk", 128, 512, 300, _k_grid("topk", 1024, 16, [1e-3, 2e-3, 3e-3, 5e-3], 2048)),
    "batchtopk": Case("batchtopk", 128, 512, 300, _k_grid("batchtopk", 1024, 16, [1e-3, 2e-3, 3e-3, 5e-3], 2048)),
    # ... and at GPU size (d=768, dictionaries 12288-24576, batch 4096): only with --device cuda.
    "dense-gpu": Case("relu", 768, 4096, 500, _relu_grid([12288, 24576], L1S, 3e-4), gpu_only=True),
    "topk-gpu": Case(
        "topk", 768, 4096, 500, _k_grid("topk", 24576, 32, [1e-4, 2e-4, 3e-4, 5e-4], 4096 * 20), gpu_only=True
    ),
    "batchtopk-gpu": Case(
        "batchtopk", 768, 4096, 500, _k_grid("batchtopk", 24576, 32, [1e-4, 2e-4, 3e-4, 5e-4], 4096 * 20), gpu_only=True
    ),
}
TINY = {  # --tiny: 20 steps at toy sizes, for the tests (does every side train at all?)
    "dense": Case("relu", 32, 64, 20, _relu_grid([64, 128], [1e-3, 3e-3], 1e-2)),
    "topk": Case("topk", 32, 64, 20, _k_grid("topk", 64, 4, [1e-2], 256)),
    "batchtopk": Case("batchtopk", 32, 64, 20, _k_grid("batchtopk", 64, 4, [1e-2], 256)),
}


def peer_fixed(peer: str, architecture: str, d_in: int) -> dict[str, float | bool]:
    """What each peer fixes and lets no user set, as our members' settings, so both sides train the same SAEs (a
    300-step training depends on them: docs/benchmarks.md, "Peers").

    encoder_init_norm: SAELens is given ours (decoder_init_norm=1.0, encoder = the decoder's transpose);
    dictionary_learning's ReLU AutoEncoder starts both at 0.1 (its top-k SAEs at unit rows); sparsify's encoder is
    nn.Linear's default init, U(-1/sqrt(d), 1/sqrt(d)), rows of norm 1/sqrt(3) in expectation.
    max_grad_norm: SAELens and dictionary_learning clip every step at 1.0 of their loss, which is d_in times ours
    (1 / d_in here); sparsify does not clip.
    learned_decoder_norm: SAELens' TopK and BatchTopK train an unconstrained W_dec whose row norms scale the
    pre-activations (rescale_acts_by_decoder_norm; with it off the rows are still free, no setting keeps them unit);
    dictionary_learning and sparsify keep unit rows, as ours do by default."""
    init = 0.1 if (peer, architecture) == ("dictionary_learning", "relu") else 3**-0.5 if peer == "sparsify" else 1.0
    fixed: dict[str, float | bool] = {
        "encoder_init_norm": init,
        "max_grad_norm": 0.0 if peer == "sparsify" else 1 / d_in,
    }
    if peer == "saelens" and architecture in ("topk", "batchtopk"):
        fixed["learned_decoder_norm"] = True
    return fixed


def our_member(case: Case, spec: dict, fixed: dict[str, float | bool] | None = None) -> Member:
    """The peer spec's member as our Member (the same hyperparameters; the runners convert them for each library)."""
    extra = {"l1": spec["l1"]} if case.architecture == "relu" else {"k": spec["k"]}
    if spec.get("auxk"):
        extra["auxk_dead_tokens"] = spec["auxk_dead_tokens"]
    return Member(
        case.architecture, case.d_in, spec["dict_size"], lr=spec["lr"], seed=spec["seed"], **(fixed or {}), **extra
    )


# -- the rows -----------------------------------------------------------------------------------------


def write_rows(case: Case, directory: Path) -> tuple[Path, Path]:
    """A synthetic store's first steps x batch_size training rows, in its stream's order, and held-out rows."""
    n_rows = case.steps * case.batch_size + HELDOUT_ROWS
    store = write_synthetic(
        directory / "store",
        d_in=case.d_in,
        n_features=2 * case.d_in,
        n_active=5,
        n_rows=n_rows + case.batch_size,
        rows_per_chunk=max(65536, case.batch_size),
        heldout_rows=HELDOUT_ROWS,
        seed=0,
    )
    stream = train_batches(store, case.batch_size, seed=0)
    train = torch.cat([next(stream)[0] for _ in range(case.steps)])
    paths = directory / "train.safetensors", directory / "heldout.safetensors"
    save_file({"activations": train.contiguous()}, paths[0])
    save_file({"activations": store.heldout().contiguous()}, paths[1])
    return paths


# -- our side -----------------------------------------------------------------------------------------


def train_ours(
    case: Case,
    train_path: Path,
    heldout_path: Path,
    device: str,
    threads: int,
    fixed: dict[str, float | bool] | None = None,
) -> dict:
    """The grid as a sweep worker trains it: planned ensembles, autotuned, stepped in turn on every batch."""
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    reuse_freed_memory()
    target = torch_device(device)
    rows = load_file(train_path)["activations"].to(target)
    heldout = load_file(heldout_path)["activations"].to(target)
    members = [our_member(case, m, fixed) for m in case.members]
    worker = f"{device}:0" if device == "cpu" else device
    plan = make_plan(members, [worker], case.batch_size, resolve_budget("auto", [worker]), ExecutionKind.auto)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    ensembles = [
        Ensemble(
            plan.ensemble_members(e.index),
            case.steps,
            target,
            execution=ExecutionKind.auto,
            micro_batches=e.micro_batches,
            freeze_after=FREEZE_AFTER,
            compile=target.type == "cuda",
        )
        for e in plan.ensembles
    ]
    for step in range(case.steps):
        batch = rows[step * case.batch_size : (step + 1) * case.batch_size]
        for ensemble in ensembles:
            ensemble.step(batch)
    sync()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    quality = {}
    for ensemble in ensembles:
        result = heldout_metrics(heldout, ensemble.forward, ensemble.hparams["feature_mask"], case.batch_size)
        for i, member in enumerate(ensemble.members):
            quality[member.member_id] = {"fvu": float(result["fvu"][i]), "l0": float(result["l0"][i])}
    by_spec = {our_member(case, m, fixed).member_id: m["member_id"] for m in case.members}
    return {
        "settings": {k: v if isinstance(v, bool) else round(v, 6) for k, v in (fixed or {}).items()},
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "execution": [e.choice for e in ensembles],
        "members": {by_spec[k]: v for k, v in quality.items()},
    }


# -- a peer's side ------------------------------------------------------------------------------------


def peer_python(peer: str) -> Path:
    python = REPO / ".interop" / peer / "bin" / "python"
    if not (REPO / ".interop" / peer / ".installed").exists():
        raise SystemExit(
            f"error: {python.parent.parent} is not built; run `make interop` (or `make bench-peers`, which builds it)"
        )
    return python


def train_peer(
    peer: str,
    case_name: str,
    case: Case,
    train_path: Path,
    heldout_path: Path,
    device: str,
    threads: int,
    directory: Path,
) -> dict:
    """Run tests/interop/peers/<peer>_runner.py in the peer's venv on the case; its OUT.json."""
    spec = {
        "case": case_name,
        "architecture": case.architecture,
        "d_in": case.d_in,
        "members": case.members,
        "batch_size": case.batch_size,
        "steps": case.steps,
        "threads": threads,
        "train_rows": str(train_path),
        "heldout_rows": str(heldout_path),
        "device": device,
    }
    spec_path, out_path = directory / f"{peer}-{case_name}.json", directory / f"{peer}-{case_name}.out.json"
    spec_path.write_text(json.dumps(spec))
    runner = REPO / "tests" / "interop" / "peers" / f"{peer}_runner.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(
        [str(peer_python(peer)), str(runner), str(spec_path), str(out_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=7200,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{peer} failed on {case_name} (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(out_path.read_text())


def compare(case_name: str, case: Case, device: str, threads: int, ours: dict, peer: dict) -> dict:
    """One JSON line: speed of the whole grid and the quality each side reached."""
    line = {
        "benchmark": "peers",
        "case": case_name,
        "peer": peer["peer"],
        "peer_version": peer.get("version"),
        "device": device,
        "architecture": case.architecture,
        "members": len(case.members),
        "d_in": case.d_in,
        "batch_size": case.batch_size,
        "steps": case.steps,
        "threads": {"ours": threads, "peer": peer.get("threads")},
        "rows": "identical rows in the same order for both sides (row block i is batch i)",
    }
    if not peer.get("supported", False):
        return {**line, "supported": False, "reason": peer.get("reason", "")}
    mean = lambda side, key: sum(m[key] for m in side.values()) / len(side)  # noqa: E731
    ours_fvu, peer_fvu = mean(ours["members"], "fvu"), mean(peer["members"], "fvu")
    trained = all(m["loss_last"] < m["loss_first"] and m["weights_changed"] for m in peer["members"].values())
    return {
        **line,
        "supported": True,
        "ours_s": round(ours["seconds"], 3),
        "peer_s": round(peer["train_seconds"], 3),
        "repeats": len(ours.get("seconds_each", [0])),
        "seconds_each": {"ours": ours.get("seconds_each"), "peer": peer.get("seconds_each")},
        "speedup": round(peer["train_seconds"] / ours["seconds"], 2),
        "cpu_seconds": {"ours": round(ours["cpu_seconds"], 2), "peer": round(peer.get("train_cpu_seconds") or 0, 2)},
        "ours_execution": ours["execution"],
        "ours_settings": ours["settings"],
        "peer_trained": trained,
        "quality": {
            "ours": {"fvu": round(ours_fvu, 5), "l0": round(mean(ours["members"], "l0"), 2)},
            "peer": {"fvu": round(peer_fvu, 5), "l0": round(mean(peer["members"], "l0"), 2)},
            "fvu_ratio": round(ours_fvu / peer_fvu, 3),
        },
        "notes": peer.get("notes", []),
    }


def run_case(
    case_name: str, case: Case, peers: list[str], device: str, threads: int, directory: Path, repeats: int = 1
) -> list[dict]:
    """Every peer's line for the case: the peer's loop and ours (with the settings that peer fixes, peer_fixed)
    each train the grid `repeats` times, alternately, and the line takes each side's median seconds (on this
    2-core VM a side's seconds moved by up to 1.5x between runs of the same work: docs/benchmarks.md)."""
    train_path, heldout_path = write_rows(case, directory)
    lines = []
    for peer in peers:
        fixed = peer_fixed(peer, case.architecture, case.d_in)
        peer_runs, our_runs = [], []
        for _ in range(repeats):
            peer_runs.append(train_peer(peer, case_name, case, train_path, heldout_path, device, threads, directory))
            if not peer_runs[-1].get("supported", False):
                break
            our_runs.append(train_ours(case, train_path, heldout_path, device, threads, fixed))
        lines.append(
            compare(
                case_name,
                case,
                device,
                threads,
                median_run(our_runs, "seconds"),
                median_run(peer_runs, "train_seconds"),
            )
        )
    return lines


def median_run(runs: list[dict], key: str) -> dict:
    """The first run (its SAEs stand for every run's: the same up to the autotuner's choice, ~1e-4 in FVU,
    docs/kernels.md; its cpu_seconds too) with its `key` seconds replaced by the median over the runs, and each
    run's in `seconds_each`."""
    if not runs or runs[0].get(key) is None:
        return runs[0] if runs else {}
    each = [run[key] for run in runs]
    return {**runs[0], key: statistics.median(each), "seconds_each": [round(x, 3) for x in each]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated, from {', '.join(CASES)} (default: those for the device)"
    )
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for both sides (default: this process's CPUs)"
    )
    parser.add_argument("--tiny", action="store_true", help="20 steps at toy sizes (the tests)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="times each side trains each case, alternately; lines take medians"
    )
    args = parser.parse_args()
    table = TINY if args.tiny else CASES
    names = (
        args.cases.split(",")
        if args.cases
        else [n for n, c in table.items() if args.device == "cuda" or not c.gpu_only]
    )
    peers = args.peers.split(",")
    unknown = [n for n in names if n not in table] + [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown {unknown}; cases: {', '.join(table)}; peers: {', '.join(PEERS)}")
    if args.device == "cpu" and any(table[n].gpu_only for n in names):
        parser.error(f"cases {[n for n in names if table[n].gpu_only]} run on a GPU only (--device cuda)")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    threads = args.threads or cpu_threads(1)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            for line in run_case(name, table[name], peers, args.device, threads, Path(tmp), args.repeats):
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
