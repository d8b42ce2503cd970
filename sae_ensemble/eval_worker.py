"""The evaluation stage: after training, each worker evaluates the members it trained, on its own device.

dispatch.evaluate runs `evaluate_worker` in one process per device once every ensemble is
done (the final reconstruction metrics and MMCS against the ground truth were already
computed by the training worker, with the ensemble still in memory). Here, per member:
    mmcs_next, mmcs_seed   MMCS against its partners' dictionaries (metrics.mmcs_between)
    CE loss recovered, KL  the member spliced into the language model (evaluate.py; LM data only)
    feature statistics     firing rates and top-activating contexts on held-out rows (features.py)
and then, in a second job once every member's statistics exist (`split_worker`), feature splitting: each
member's chosen latents matched in its next dictionary size.
Members are loaded from `members/<id>/` a group at a time (`MEMBERS_PER_GROUP`, the members one
spliced forward pass evaluates): the device never holds every member, and the parent only reads
the results. Each member's results go to `members/<id>/eval.json`, written last: a stopped
evaluation resumes with the members that lack it, and finished ones are not evaluated again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.checkpoint import read_evaluation, write_evaluation
from sae_ensemble.config import Training
from sae_ensemble.devices import torch_device
from sae_ensemble.features import FeatureSettings, load_tokenizer, splits_written, write_group_features, write_splits
from sae_ensemble.member import Member
from sae_ensemble.metrics import mmcs_between, partners_of
from sae_ensemble.rundir import Plan, RunDir

MEMBERS_PER_GROUP = 8  # members loaded at once: one spliced forward pass of the CE evaluation evaluates them all


@dataclass
class LMEvaluation:
    """What the CE evaluation needs (the pipeline fills it from the config; plain data for the workers)."""

    model: str
    revision: str | None
    hook: str
    dataset: str
    split: str
    dataset_config: str | None
    text_field: str
    context_length: int
    n_tokens: int
    """Rows harvested for training: held-out contexts start after the contexts that gave them."""
    drop_bos: bool
    n_contexts: int


@dataclass
class Evaluation:
    """What the evaluation stage computes beside MMCS (the pipeline fills it from the config)."""

    lm: LMEvaluation | None = None
    """CE loss recovered in this language model (None: no CE)."""
    features: FeatureSettings | None = None
    """Feature statistics and contexts with these settings (None: none)."""


# -- what one member's evaluation holds ----------------------------------------------------------


def member_dir(run_dir: Path, member_id: str) -> Path:
    return RunDir(run_dir).member(member_id).path


def evaluated(run_dir: Path, member_id: str, with_ce: bool) -> bool:
    """True when the member has eval.json covering what is asked (CE scores too, when `with_ce`)."""
    evaluation = read_evaluation(member_dir(run_dir, member_id))
    return evaluation is not None and (evaluation.get("ce_loss", False) or not with_ce)


class Decoders(Mapping):
    """member_id -> saved W_dec [dict_size, d] on `device`, read on access so only the pair compared is held."""

    def __init__(self, run_dir: Path, member_ids: Sequence[str], device: torch.device) -> None:
        self.run_dir, self.ids, self.device = run_dir, list(member_ids), device
        self.known = set(self.ids)

    def __contains__(self, member_id: object) -> bool:  # Mapping's default would read the tensor
        return member_id in self.known

    def __getitem__(self, member_id: str) -> torch.Tensor:
        if member_id not in self.known:
            raise KeyError(member_id)
        with safe_open(str(RunDir(self.run_dir).member(member_id).sae), framework="pt") as f:
            return f.get_tensor("W_dec").to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


# -- the stage ------------------------------------------------------------------------------------


def pending(run_dir: Path, member_ids: Sequence[str], with_ce: bool) -> list[str]:
    """The members of `member_ids` still to evaluate (in order)."""
    return [member_id for member_id in member_ids if not evaluated(run_dir, member_id, with_ce)]


def evaluate_members_of_run(
    run_dir: Path,
    mine: Sequence[str],
    members: Sequence[Member],
    device: torch.device,
    ce: Callable[[str | None, list[Path]], dict[str, dict[str, float]]] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_group: Callable[[int], None] = lambda n: None,
) -> bool:
    """Evaluate the members `mine` (ids) of a run whose members are `members`, a group at a time; False if stopped
    first.

    Members evaluated before (eval.json, covering CE when `ce` is given) are skipped. `ce(hook, dirs)` gives CE
    metrics by member id for member dirs of one member hook (None: no CE evaluation).
    """
    todo = pending(run_dir, mine, ce is not None)
    hook_of = {m.member_id: m.hook for m in members}
    decoders = Decoders(run_dir, [m.member_id for m in members], device)
    for start in range(0, len(todo), MEMBERS_PER_GROUP):
        if should_stop():
            return False
        group = list(todo[start : start + MEMBERS_PER_GROUP])
        results: dict[str, dict[str, float]] = {member_id: {} for member_id in group}
        for column, pairing in (("mmcs_next", "next_size"), ("mmcs_seed", "seed")):
            for member_id, value in mmcs_between(members, decoders, pairing=pairing, of=group).items():
                results[member_id][column] = value
        for hook in dict.fromkeys(hook_of[member_id] for member_id in group):
            dirs = [member_dir(run_dir, member_id) for member_id in group if hook_of[member_id] == hook]
            for member_id, values in ce(hook, dirs).items() if ce is not None else ():
                results[member_id].update(values)
        for member_id, values in results.items():
            write_evaluation(member_dir(run_dir, member_id), values, ce is not None)
        on_group(len(group))
    return True


def _worker_device(device: str, threads: int) -> torch.device:
    """An evaluation worker's device, made current (CUDA), with its share of the CPU threads."""
    torch.set_num_threads(threads)
    device_ = torch_device(device)
    if device_.type == "cuda":
        torch.cuda.set_device(device_)
    return device_


def evaluate_worker(
    index: int,
    device: str,
    plan: Plan,
    store_paths: dict[str | None, str],
    run_dir: Path,
    training: Training,
    evaluation: Evaluation,
    threads: int,
    events,
    stop,
) -> None:
    """Worker `index`'s share of the evaluation: the members of its ensembles (see the module doc)."""
    device_ = _worker_device(device, threads)
    mine = [m.member_id for i in plan.workers[index].ensembles for m in plan.ensemble_members(i)]
    lm = evaluation.lm
    todo = pending(run_dir, mine, lm is not None)
    events.put(("start", index, {"step": len(mine) - len(todo)}))
    needs_stores = todo and (lm is not None or evaluation.features is not None)
    stores = {hook: ActivationStore.open(path) for hook, path in store_paths.items()} if needs_stores else {}
    ce = None
    if todo and lm is not None:
        ce = _ce_evaluator(lm, stores, training, device_, lambda text: events.put(("note", index, text)))
    if todo and evaluation.features is not None:
        if not _write_features(plan, index, set(todo), stores, run_dir, training, evaluation.features, device_, stop):
            events.put(("stopped", index, None))
            return
    done = len(mine) - len(todo)

    def report(n: int) -> None:
        nonlocal done
        done += n
        events.put(("progress", index, {"step": done}))

    members = list(plan.members.values())
    if evaluate_members_of_run(run_dir, mine, members, device_, ce, stop.is_set, report):
        events.put(("done", index, None))
    else:
        events.put(("stopped", index, None))


def _write_features(
    plan: Plan, index: int, todo: set[str], stores, run_dir: Path, training: Training, settings, device, stop
) -> bool:
    """Feature statistics of worker `index`'s members to evaluate, an ensemble at a time: one pass over the held-out
    rows for all of an ensemble's members (its training step held them all on this device). False if stopped."""
    tokenizers = {hook: load_tokenizer(store) for hook, store in stores.items()}
    for i in plan.workers[index].ensembles:
        if stop.is_set():
            return False
        members = [m for m in plan.ensemble_members(i) if m.member_id in todo]
        dirs = [RunDir(run_dir).member(m.member_id) for m in members]
        dirs = [d.path for d in dirs if not d.features.exists()]  # written by an earlier, stopped evaluation
        if dirs:
            hook = members[0].hook  # an ensemble holds one hook's members
            write_group_features(dirs, stores[hook], training.normalize, device, settings, tokenizers[hook])
    return True


def split_worker(
    index: int,
    device: str,
    plan: Plan,
    store_paths: dict[str | None, str],
    run_dir: Path,
    training: Training,
    evaluation: Evaluation,
    threads: int,
    events,
    stop,
) -> None:
    """Worker `index`'s feature splitting, the evaluation's second job (every member's statistics exist by then):
    each of its members with a next-size partner gets its chosen latents' matches there (features.write_splits)."""
    device_ = _worker_device(device, threads)
    mine = [m for i in plan.workers[index].ensembles for m in plan.ensemble_members(i)]
    next_size = {member_id: partners[0] for member_id, partners in partners_of(list(plan.members.values())).items()}
    todo = [m for m in mine if m.member_id in next_size and not splits_written(member_dir(run_dir, m.member_id))]
    events.put(("start", index, {"step": len(mine) - len(todo)}))
    stores = {hook: ActivationStore.open(store_paths[hook]) for hook in {m.hook for m in todo}}
    tokenizers = {hook: load_tokenizer(store) for hook, store in stores.items()}
    for done, member in enumerate(todo, start=len(mine) - len(todo) + 1):
        if stop.is_set():
            events.put(("stopped", index, None))
            return
        partner = member_dir(run_dir, next_size[member.member_id].member_id)
        store = stores[member.hook]
        write_splits(
            member_dir(run_dir, member.member_id),
            partner,
            store,
            training.normalize,
            device_,
            evaluation.features,
            tokenizers[member.hook],
        )
        events.put(("progress", index, {"step": done}))
    events.put(("done", index, None))


def _ce_evaluator(
    lm: LMEvaluation,
    stores: dict[str | None, ActivationStore],
    training: Training,
    device: torch.device,
    note: Callable[[str], None],
):
    """The CE evaluation of member dirs of one member hook on `device` (the model booted once), or None without
    held-out text. Members of a run over one store (hook None) read the run's hook, `lm.hook`."""
    from sae_ensemble.activations.lm import boot_model, free_device_memory, iter_contexts, iter_texts, rows_per_context
    from sae_ensemble.evaluate import evaluate_members

    bridge = boot_model(lm.model, device=str(device), revision=lm.revision)
    # Held-out text: the contexts after the ones harvested for training.
    texts = iter_texts(lm.dataset, lm.split, lm.dataset_config, lm.text_field)
    skip = -(-lm.n_tokens // rows_per_context(bridge.tokenizer, lm.context_length, lm.drop_bos))
    contexts = []
    for i, context in enumerate(iter_contexts(texts, bridge.tokenizer, lm.context_length)):
        if i >= skip:
            contexts.append(context)
        if len(contexts) == lm.n_contexts:
            break
    if not contexts:
        note(f"warning: no held-out text left after the {skip} harvested contexts; CE evaluation skipped")
        del bridge
        free_device_memory(device)
        return None
    tokens = torch.tensor(contexts, device=device)
    skip_first = lm.drop_bos and bridge.tokenizer.bos_token_id is not None

    # Per group, the clean and zero-ablated passes run again (2 passes beside the group's spliced one,
    # which is MEMBERS_PER_GROUP times as large): the price of never holding more members than a group.
    # A transcoder's store names its output hook: its members read `hook` and are spliced in at the output.
    def ce(hook: str | None, dirs: list[Path]) -> dict[str, dict[str, float]]:
        hook_out = (stores[hook].manifest.get("source") or {}).get("hook_out")
        return evaluate_members(
            bridge,
            tokens,
            hook_out or hook or lm.hook,
            dirs,
            None if hook_out else stores[hook].normalization(training.normalize),
            progress=False,
            members_per_pass=MEMBERS_PER_GROUP,
            skip_first_position=skip_first,
            input_hook=(hook or lm.hook) if hook_out else None,
        )

    return ce
