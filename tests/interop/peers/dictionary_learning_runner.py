"""Train a spec's members with dictionary_learning's own loop: one `trainSAE` call with a list of trainer configs.

    .interop/dictionary_learning/bin/python tests/interop/peers/dictionary_learning_runner.py SPEC.json OUT.json

Entry point: `dictionary_learning.training.trainSAE(data=iterator, trainer_configs=[...], steps=...)`, its
documented way to train several SAEs: it builds every trainer, then for each batch calls every
trainer's `update` in turn (so the members share each batch, in file order; we hand it an iterator
of row blocks instead of its ActivationBuffer, whose mixing would reorder rows).
  relu      -> StandardTrainer (AutoEncoder, unit-norm decoder kept by ConstrainedAdam: our objective)
  topk      -> TopKTrainer (AutoEncoderTopK, AuxK)
  batchtopk -> BatchTopKTrainer (BatchTopKSAE, AuxK, running inference threshold)
  jumprelu  -> unsupported: its JumpReluTrainer penalises (L0 / target_l0 - 1)^2, not l0_coefficient * L0.
Each trainer class is wrapped in `Recorded` (below) only to read its loss and time its updates.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version

import common  # first: sets TQDM_DISABLE before the library imports tqdm
import torch
from dictionary_learning.dictionary import AutoEncoder
from dictionary_learning.trainers import BatchTopKTrainer, StandardTrainer, TopKTrainer
from dictionary_learning.training import trainSAE

NEVER = 1 << 62  # a dead-feature window in tokens that no run reaches
BUILT = []  # the trainers trainSAE builds, in config order (it returns nothing)


class Recorded:
    """Mixin over a dictionary_learning trainer: keeps each step's training loss (detached, unsynced), times
    construction and every `update` (CUDA events on a GPU, so no extra synchronisation), and sets the
    AuxK window and k_aux, which its trainers hard-code (10M tokens, d_in // 2) rather than take."""

    def __init__(self, *, dead_tokens: int | None = None, k_aux: int | None = None, **config):
        start = time.perf_counter()
        super().__init__(**config)
        if dead_tokens is not None:
            self.dead_feature_threshold = dead_tokens
        if k_aux:
            self.top_k_aux = k_aux
        self.losses, self.events = [], []
        self.seconds = time.perf_counter() - start
        self.before = self.ae.encoder.weight.detach().clone()
        BUILT.append(self)

    def loss(self, x, step=None, logging=False, **kwargs):
        out = super().loss(x, step=step, logging=logging, **kwargs)
        if not logging:
            self.losses.append(out.detach())
        return out

    def update(self, step, activations):
        if activations.is_cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            super().update(step, activations)
            end.record()
            self.events.append((begin, end))
        else:
            start = time.perf_counter()
            super().update(step, activations)
            self.seconds += time.perf_counter() - start

    def total_seconds(self) -> float:
        return self.seconds + sum(b.elapsed_time(e) for b, e in self.events) / 1000


def recorded(cls):
    return type(f"Recorded{cls.__name__}", (Recorded, cls), {})


def trainer_config(arch: str, m: dict, spec: dict) -> dict:
    d, steps = spec["d_in"], spec["steps"]
    # layer / lm_name are required labels (asserted non-None), unused in training.
    base = dict(
        steps=steps,
        activation_dim=d,
        dict_size=m["dict_size"],
        layer=0,
        lm_name="peers-benchmark",
        lr=m["lr"],
        warmup_steps=0,
        decay_start=None,
        seed=m["seed"],
        device=spec["device"],
        wandb_name=m["member_id"],
    )
    if arch == "relu":
        # Its loss: sum_d (x - x_hat)^2 averaged over rows + l1_penalty * ||f||_1 averaged over rows, with
        # unit-norm decoder columns; ours averages the MSE over d_in too, so l1_penalty = l1 * d_in.
        return dict(
            base,
            trainer=recorded(StandardTrainer),
            dict_class=AutoEncoder,
            l1_penalty=m["l1"] * d,
            sparsity_warmup_steps=0,
            resample_steps=None,
        )
    coefficient, dead_rows, k_aux = common.auxk_settings(m, d)
    # AuxK on: dead = no firing in the last `dead_rows` tokens (its count is in tokens, like ours).
    aux = dict(auxk_alpha=coefficient, dead_tokens=dead_rows if coefficient else NEVER, k_aux=k_aux or None)
    if arch == "topk":
        # threshold_start_step=steps: no running threshold (only for its optional thresholded encode; ours has none).
        return dict(base, trainer=recorded(TopKTrainer), k=m["k"], threshold_start_step=steps, **aux)
    if arch == "batchtopk":
        # Its inference threshold: an EMA of the smallest kept activation with weight threshold_beta, from step 1.
        return dict(
            base,
            trainer=recorded(BatchTopKTrainer),
            k=m["k"],
            threshold_start_step=0,
            threshold_beta=1 - m.get("topk_threshold_lr", common.TOPK_THRESHOLD_LR),
            **aux,
        )
    raise ValueError(arch)


def main(spec_path: str, out_path: str) -> None:
    spec = common.load_spec(spec_path)
    arch, device = spec["architecture"], spec["device"]
    lib_version = version("dictionary-learning")
    if arch == "jumprelu":
        reason = (
            "dictionary_learning 0.1.0's JumpReluTrainer minimises sum_d MSE + sparsity_penalty * "
            "(L0 / target_l0 - 1)^2 (a quadratic pull to a target L0), with no decoder bias subtracted before "
            "encoding; no setting gives our loss MSE + l0_coefficient * L0, so it would train a different SAE"
        )
        common.write(out_path, common.result("dictionary_learning", lib_version, spec, False, reason))
        return
    out = common.result("dictionary_learning", lib_version, spec)
    rows = common.load_rows(spec["train_rows"], device)
    heldout = common.load_rows(spec["heldout_rows"], device)
    configs = [trainer_config(arch, m, spec) for m in spec["members"]]

    start, cpu_start = common.clock(device), common.cpu_clock()
    trainSAE(
        data=common.batches(rows, spec["batch_size"], spec["steps"]),
        trainer_configs=configs,
        steps=spec["steps"],
        use_wandb=False,
        save_dir=None,
        log_steps=None,
        normalize_activations=False,
        verbose=False,
        device=device,
        autocast_dtype=torch.float32,
    )
    out["train_seconds"], out["train_cpu_seconds"] = common.clock(device) - start, common.cpu_clock() - cpu_start

    for m, trainer in zip(spec["members"], BUILT):
        ae = trainer.ae.eval()

        def forward(x, ae=ae):
            codes = ae.encode(x)  # BatchTopKSAE.encode thresholds by default: its inference form
            return codes, ae.decode(codes)

        out["members"][m["member_id"]] = common.member_result(
            trainer.total_seconds(),
            common.heldout_metrics(forward, heldout),
            trainer.losses[0].item(),
            trainer.losses[-1].item(),
            common.changed(trainer.before, ae.encoder.weight),
        )
    d = spec["d_in"]
    out["notes"] += [
        "entry point: dictionary_learning.training.trainSAE with all members' trainer configs in one call; every "
        "trainer steps on each batch in turn. A member's seconds = its construction + its update calls; "
        "train_seconds = the whole trainSAE call",
        "loss_first/loss_last: the loss its update() backpropagates (trainer.loss(..., logging=False)) at the first "
        "and last step, in its units: sum over d_in of the squared error averaged over rows, plus its other terms",
        f"conversions: its MSE is d_in={d} times ours, so l1_penalty = l1 * d_in; Adam (betas 0.9, 0.999) is "
        "scale-invariant, so lr is ours; warmup_steps=0, sparsity_warmup_steps=0, decay_start=None (constant lr)",
    ]
    if arch == "relu":
        out["notes"].append(
            "relu: StandardTrainer's AutoEncoder starts with encoder and decoder at norm 0.1 (ours 1); "
            "ConstrainedAdam renormalises the decoder to unit columns after each step, as ours"
        )
    else:
        out["notes"] += [
            "always on, not configurable: clip_grad_norm_(params, 1.0) each step (its loss is d_in times ours); "
            "b_dec set to the geometric median of the first batch (up to 100 iterations) at step 0",
            "AuxK differs from ours and cannot be set to match: it reconstructs from post-ReLU activations of dead "
            "latents (ours: pre-activations) and divides by the residual's variance instead of scaling by "
            "min(n_dead / k_aux, 1); auxk_alpha = our auxk_coefficient, dead_feature_threshold (tokens) and "
            "top_k_aux are set on the trainer after construction (its __init__ hard-codes 10M tokens and d_in // 2)",
        ]
    if arch == "batchtopk":
        out["notes"].append(
            "batchtopk: threshold_beta = 1 - topk_threshold_lr; its threshold starts at the first "
            "minimum (ours: an EMA from 0); held-out codes use the threshold (encode's default)"
        )
    common.write(out_path, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
