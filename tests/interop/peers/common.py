"""Helpers shared by the three peer runners (see README.md in this folder for the contract).

Imports only json/numpy/torch/safetensors, so each library's own venv (make interop) can run it.
The runners import it as a sibling module: `python tests/interop/peers/<lib>_runner.py` puts this
folder first on sys.path.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import load_file

# Progress bars (tqdm reads TQDM_DISABLE) would only add terminal writes to the timed loops.
os.environ.setdefault("TQDM_DISABLE", "1")

# Members' optional fields, read with these defaults when a spec leaves them out. They are our
# Member's defaults (sae_ensemble/member.py), so a spec that names only what the contract lists
# still asks every side for the same SAE.
AUXK_COEFFICIENT = 1 / 32  # Gao et al.'s alpha
AUXK_DEAD_TOKENS = 2000  # rows without firing after which a latent counts as dead (conf/grid/architectures.yaml)
TOPK_THRESHOLD_LR = 0.01  # batchtopk: rate of the running inference-threshold estimate (SAELens' name)
BANDWIDTH = 0.05  # jumprelu: width of the straight-through estimators' rectangle kernel


def load_spec(path: str) -> dict:
    """Read SPEC.json and set the torch thread count first, before any library does work."""
    with open(path) as f:
        spec = json.load(f)
    torch.set_num_threads(int(spec["threads"]))
    return spec


def load_rows(path: str, device: str) -> torch.Tensor:
    """The "activations" tensor of a safetensors file, float32, on `device` (not timed by the runners)."""
    rows = load_file(path)["activations"].to(device=device, dtype=torch.float32)
    synchronize(device)
    return rows


def batches(rows: torch.Tensor, batch_size: int, steps: int) -> Iterator[torch.Tensor]:
    """Row block i is batch i, in file order: no shuffling, no buffer mixing."""
    if rows.shape[0] < batch_size * steps:
        raise ValueError(
            f"train_rows holds {rows.shape[0]} rows; {steps} steps of {batch_size} need {batch_size * steps}"
        )
    for i in range(steps):
        yield rows[i * batch_size : (i + 1) * batch_size]


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    synchronize(device)
    return time.perf_counter()


def cpu_clock() -> float:
    """CPU seconds of this process, all threads: on a shared machine, less skewed by other load than wall time."""
    return time.process_time()


@torch.no_grad()
def heldout_metrics(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], heldout: torch.Tensor, chunk: int = 4096
) -> dict[str, float]:
    """FVU, L0 and MSE of a trained SAE on held-out rows, from the library's own encode/decode.

    `forward(x)` returns (codes [B, n] or the k active values [B, k], x_hat [B, d]).
    FVU = sum ||x_hat - x||^2 / sum ||x - mean(x)||^2 over all held-out rows (mean over the rows);
    L0 = mean number of nonzero codes per row; MSE = mean over elements of (x_hat - x)^2 (our loss's term).
    Sums run in float64 so long held-out sets do not round.
    """
    mean = heldout.double().mean(0)
    sse = total = nonzero = 0.0
    for start in range(0, heldout.shape[0], chunk):
        x = heldout[start : start + chunk]
        codes, x_hat = forward(x)
        sse += (x_hat.double() - x.double()).pow(2).sum().item()
        total += (x.double() - mean).pow(2).sum().item()
        nonzero += (codes != 0).sum().item()
    rows, d = heldout.shape
    return {"fvu": sse / total, "l0": nonzero / rows, "mse": sse / (rows * d)}


def changed(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Did training move the encoder weights at all."""
    return not torch.equal(before.detach().cpu(), after.detach().cpu())


def result(peer: str, version: str, spec: dict, supported: bool = True, reason: str = "") -> dict:
    """The OUT.json skeleton; runners fill train_seconds, members and notes."""
    out = {
        "peer": peer,
        "version": version,
        "case": spec["case"],
        "architecture": spec["architecture"],
        "device": spec["device"],
        "supported": supported,
        "threads": torch.get_num_threads(),
        "train_seconds": None,
        "train_cpu_seconds": None,
        "members": {},
        "notes": [],
    }
    if not supported:
        out["reason"] = reason
    return out


def member_result(
    seconds: float, metrics: dict[str, float], loss_first: float, loss_last: float, weights_changed: bool
) -> dict:
    return {
        "seconds": seconds,
        **metrics,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "weights_changed": weights_changed,
    }


def write(path: str, out: dict) -> None:
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "members"}), file=sys.stderr)


def auxk_settings(member: dict, d_in: int) -> tuple[float, int, int]:
    """(coefficient, dead-window in rows, k_aux) of a topk/batchtopk member; coefficient 0 when AuxK is off."""
    if not member.get("auxk", False):
        return 0.0, 0, 0
    return (
        float(member.get("auxk_coefficient", AUXK_COEFFICIENT)),
        int(member.get("auxk_dead_tokens", AUXK_DEAD_TOKENS)),
        int(member.get("k_aux") or d_in // 2),
    )
