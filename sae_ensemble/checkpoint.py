"""Members on disk: `<dir>/sae.safetensors`, `<dir>/optim.safetensors`, `<dir>/cfg.json`.

sae.safetensors (float32; n = dict_size, d = d_in): the params of the member's architecture
(architectures/<module>.PARAMS), for sae.py's relu, tied and topk:
    W_enc [n, d]   encoder rows
    b_enc [n]      encoder bias
    W_dec [n, d]   unit-norm decoder rows (the dictionary; for tied SAEs, the normalised encoder)
    b_dec [d]      decoder bias, subtracted before encoding and added after decoding (zeros if unused)
batchtopk and matryoshka add threshold [] (the inference threshold); jumprelu adds log_threshold [n];
gated has W_enc, b_gate, r_mag, b_mag [n], W_dec, b_dec.
optim.safetensors: Adam moments `mu.<name>` and `nu.<name>` of the same shapes, and `state.tokens_since_fired` [n]
(rows since each feature last fired: the AuxK dead mask), for resuming exactly.
cfg.json: every Member field plus member_id, steps, tokens and whatever the caller adds
(store fingerprint, final metrics). It is written last, so a directory with cfg.json is complete.
eval.json (after the evaluation stage, eval_worker.py): {"metrics": {mmcs_next, mmcs_seed, CE scores},
"ce_loss": whether CE was evaluated}; a member without it has not been evaluated yet.

Every write goes to a temporary file in the same directory and is renamed into
place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_ensemble import architectures
from sae_ensemble.atomic import atomic_write, write_json_atomic
from sae_ensemble.ensemble import Ensemble
from sae_ensemble.member import Member

SAE_FILE = "sae.safetensors"
OPTIM_FILE = "optim.safetensors"
CFG_FILE = "cfg.json"
EVAL_FILE = "eval.json"


class CheckpointError(ValueError):
    """A member directory is missing, incomplete or does not match its cfg.json."""


def read_json(path: str | Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


def save_member(
    directory: str | Path,
    member: Member,
    params: dict[str, torch.Tensor],
    moments: dict[str, torch.Tensor] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write one member; `info` (steps, tokens, metrics, ...) goes into cfg.json."""
    directory = Path(directory)
    _check_shapes(directory / SAE_FILE, member, params)
    atomic_write(directory / SAE_FILE, lambda tmp: save_file({k: v.contiguous() for k, v in params.items()}, tmp))
    if moments is not None:
        atomic_write(directory / OPTIM_FILE, lambda tmp: save_file({k: v.contiguous() for k, v in moments.items()}, tmp))
    cfg = {**member.to_dict(), "member_id": member.member_id, **(info or {})}
    write_json_atomic(directory / CFG_FILE, cfg)
    return directory


def load_member(
    directory: str | Path, with_moments: bool = False
) -> tuple[Member, dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(member, params, moments or None, cfg) of a saved member, checked against its cfg.json."""
    directory = Path(directory)
    cfg = read_json(directory / CFG_FILE)
    member = Member.from_dict({k: v for k, v in cfg.items() if k in Member.__dataclass_fields__})
    params = _load_tensors(directory / SAE_FILE)
    _check_shapes(directory / SAE_FILE, member, params)
    moments = None
    if with_moments:
        moments = _load_tensors(directory / OPTIM_FILE)
        for prefix in ("mu", "nu"):
            part = {k.split(".", 1)[1]: v for k, v in moments.items() if k.startswith(prefix + ".")}
            _check_shapes(directory / OPTIM_FILE, member, part, prefix=prefix + ".")
    return member, params, moments, cfg


def read_evaluation(directory: str | Path) -> dict[str, float]:
    """The metrics of a member's eval.json ({} before its evaluation)."""
    path = Path(directory) / EVAL_FILE
    return read_json(path)["metrics"] if path.exists() else {}


def load_ensemble(
    directories: list[str | Path], total_steps: int, device: str | torch.device = "cpu", autocast_bf16: bool = False, **options,
) -> Ensemble:
    """An ensemble restored from saved members, optimizer moments and step included (to resume).
    `options` are Ensemble's keyword options (execution, micro_batches, ...).

    The stacked state is allocated empty on the device and filled one member at a time,
    so the host holds one member's tensors at most (no random init to throw away).
    """
    cfgs = [read_json(Path(d) / CFG_FILE) for d in directories]
    steps = {cfg.get("steps") for cfg in cfgs}
    if len(steps) != 1:
        raise CheckpointError(f"members in {[str(d) for d in directories]} were saved at different steps {sorted(steps, key=str)}")
    members = [Member.from_dict({k: v for k, v in cfg.items() if k in Member.__dataclass_fields__}) for cfg in cfgs]
    ensemble = Ensemble(members, total_steps, device, autocast_bf16, init=False, **options)
    for index, directory in enumerate(directories):
        _, params, moments, cfg = load_member(directory, with_moments=True)
        ensemble.load_member_state(index, params, moments)
        ensemble.alive[index] = bool(cfg.get("alive", True))
        ensemble.nonfinite_streak[index] = int(cfg.get("nonfinite_streak", 0))
        if "controller" in cfg:  # target-L0 members' controller (steering.py); older checkpoints have none
            ensemble.load_controller_state(index, cfg["controller"])
        del params, moments
    ensemble.set_step(cfgs[0]["steps"], cfgs[0]["tokens"])
    return ensemble


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None


def _check_shapes(path: Path, member: Member, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every param of the member's architecture present with its shape."""
    n, d = member.dict_size, member.d_in
    shapes = architectures.param_shapes(architectures.module_of(member.variant), d, n)
    expected = tuple(shapes)
    missing = [prefix + name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(f"{path} lacks tensors {missing}; a {member.variant} SAE needs {[prefix + e for e in expected]}")
    for name in expected:
        if tuple(tensors[name].shape) != shapes[name]:
            raise CheckpointError(
                f"{path}: tensor {prefix}{name} has shape {list(tensors[name].shape)}, "
                f"expected {list(shapes[name])} for d_in={d}, dict_size={n}"
            )
