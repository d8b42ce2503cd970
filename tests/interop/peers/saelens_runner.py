"""Train a spec's members with SAELens's own training loop, one SAE after another.

    .interop/saelens/bin/python tests/interop/peers/saelens_runner.py SPEC.json OUT.json

Entry point: `sae_lens.SAETrainer(cfg, sae, data_provider).fit()`, the loop that both
`LanguageModelSAETrainingRunner` and SAELens's own `SyntheticSAERunner` call, fed with an iterator
of our activation batches (the runners' model / ActivationsStore only produce such batches; their
buffer mixing is skipped because we hand the batches over in file order). With
`"saelens_mode": "multi"` in the spec, the members train instead in lockstep through
`sae_lens.training.multi_sae_trainer.MultiSAETrainer` (6.54's coordinator: one SAETrainer per SAE
stepped on the same batch, all sharing one SAETrainerConfig, so only when the members share lr and
AuxK window). README.md in this folder lists every conversion.
"""

from __future__ import annotations

import sys
import tempfile
from importlib.metadata import version

import common  # first: sets TQDM_DISABLE before the library imports tqdm
import sae_lens
import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    LoggingConfig,
    SAETrainer,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.training.multi_sae_trainer import MultiSAETrainer


def build_sae(arch: str, m: dict, spec: dict) -> tuple[torch.nn.Module, int]:
    """SAELens training SAE for one member, and its dead-feature window in steps (AuxK)."""
    d, steps, device = spec["d_in"], spec["steps"], spec["device"]
    # Our init: unit-norm decoder rows, encoder = their transpose (SAELens' default scales them to 0.1).
    base = dict(
        d_in=d,
        d_sae=m["dict_size"],
        device=device,
        decoder_init_norm=1.0,
        apply_b_dec_to_input=True,
        normalize_activations="none",
    )
    never = steps + 1  # a window no latent can reach: nobody counts as dead
    torch.manual_seed(m["seed"])
    if arch == "relu":
        # SAELens: sum_d (x_hat - x)^2 averaged over rows + l1 * sum_i |c_i| ||W_dec_i||, also over rows;
        # ours: the same MSE averaged over d_in, and unit-norm decoder rows; so l1_SAELens = l1 * d_in.
        cfg = StandardTrainingSAEConfig(**base, l1_coefficient=m["l1"] * d, lp_norm=1.0, l1_warm_up_steps=0)
        return StandardTrainingSAE(cfg), never
    if arch in ("topk", "batchtopk"):
        coefficient, dead_rows, _ = common.auxk_settings(m, d)
        # AuxK: SAELens scales its aux term like its MSE (both sums over d_in), so the coefficient is ours.
        # Its dead window counts steps: dead = more than `window` steps without firing.
        window = max(1, round(dead_rows / spec["batch_size"])) if coefficient else never
        extra = dict(k=m["k"], aux_loss_coefficient=coefficient, rescale_acts_by_decoder_norm=True)
        if arch == "topk":
            return TopKTrainingSAE(TopKTrainingSAEConfig(**base, **extra)), window
        rate = m.get("topk_threshold_lr", common.TOPK_THRESHOLD_LR)
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**base, **extra, topk_threshold_lr=rate)), window
    if arch == "jumprelu":
        # "step" L0 loss: l0_SAELens * mean_rows(L0) against its sum_d MSE, so l0_SAELens = l0_coefficient * d_in.
        cfg = JumpReLUTrainingSAEConfig(
            **base,
            jumprelu_init_threshold=m["threshold"],
            jumprelu_bandwidth=m.get("bandwidth", common.BANDWIDTH),
            jumprelu_sparsity_loss_mode="step",
            l0_coefficient=m["l0_coefficient"] * d,
            l0_warm_up_steps=0,
            pre_act_loss_coefficient=None,
            jumprelu_ste_to_input=False,
        )
        return JumpReLUTrainingSAE(cfg), never
    raise ValueError(f"unknown architecture {arch!r}")


def trainer_config(spec: dict, lr: float, window: int) -> SAETrainerConfig:
    # Constant Adam lr (no warm-up, no decay; lr_end = lr / 10 is what SAELens' runner configs fill in, unused
    # by "constant"), Adam betas as ours, no wandb, no checkpoints, no feature-sparsity window reset.
    return SAETrainerConfig(
        total_training_samples=spec["steps"] * spec["batch_size"],
        train_batch_size_samples=spec["batch_size"],
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device=spec["device"],
        autocast=False,
        dead_feature_window=window,
        feature_sampling_window=spec["steps"] + 1,
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )


def record_losses(trainer: SAETrainer, losses: list) -> None:
    """Keep the loss SAELens backpropagates (TrainStepOutput.loss, its losses/overall_loss) of each step, unsynced."""
    step = trainer.step

    def recorded(batch):
        out = step(batch)
        losses.append(out.loss.detach())
        return out

    trainer.step = recorded


def evaluate(sae, heldout: torch.Tensor) -> dict:
    """Metrics from SAELens's inference SAE: the form it saves and loads (BatchTopK becomes JumpReLU with
    the learned threshold, TopK's decoder norms are folded in)."""
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        model = SAE.load_from_disk(tmp, device=str(heldout.device))

    def forward(x):
        codes = model.encode(x)
        return codes, model.decode(codes)

    return common.heldout_metrics(forward, heldout)


def main(spec_path: str, out_path: str) -> None:
    spec = common.load_spec(spec_path)
    out = common.result("saelens", version("sae-lens"), spec)
    arch, device, multi = spec["architecture"], spec["device"], spec.get("saelens_mode") == "multi"
    rows = common.load_rows(spec["train_rows"], device)
    heldout = common.load_rows(spec["heldout_rows"], device)
    members = spec["members"]
    saes, before, losses, seconds = {}, {}, {m["member_id"]: [] for m in members}, {}

    if multi and (len({m["lr"] for m in members}) > 1 or len({common.auxk_settings(m, 1)[:2] for m in members}) > 1):
        common.write(
            out_path,
            common.result(
                "saelens",
                version("sae-lens"),
                spec,
                False,
                "MultiSAETrainer shares one SAETrainerConfig (lr, dead-feature window) across "
                "its SAEs; these members differ in lr or AuxK window",
            ),
        )
        return
    start, cpu_start = common.clock(device), common.cpu_clock()
    if multi:
        built = {m["member_id"]: build_sae(arch, m, spec) for m in members}
        lr, window = members[0]["lr"], next(iter(built.values()))[1]  # checked above: one shared config
        saes = {name: sae for name, (sae, _) in built.items()}
        before = {name: sae.W_enc.detach().clone() for name, sae in saes.items()}
        data = ({"acts": b} for b in common.batches(rows, spec["batch_size"], spec["steps"]))
        coordinator = MultiSAETrainer(trainer_config(spec, lr, window), saes, {n: "acts" for n in saes}, data)
        for name, trainer in coordinator.trainers.items():
            record_losses(trainer, losses[name])
        coordinator.fit()
        total = common.clock(device) - start
        seconds = {name: total / len(saes) for name in saes}
        out["notes"].append(
            "saelens_mode=multi: MultiSAETrainer steps every SAE on each batch; a member's "
            "seconds is train_seconds / members (the lockstep loop does not split them)"
        )
    else:
        for m in members:
            t0 = common.clock(device)
            sae, window = build_sae(arch, m, spec)
            before[m["member_id"]] = sae.W_enc.detach().clone()
            trainer = SAETrainer(
                cfg=trainer_config(spec, m["lr"], window),
                sae=sae,
                data_provider=common.batches(rows, spec["batch_size"], spec["steps"]),
            )
            record_losses(trainer, losses[m["member_id"]])
            saes[m["member_id"]] = trainer.fit()
            seconds[m["member_id"]] = common.clock(device) - t0
        total = common.clock(device) - start
    out["train_seconds"], out["train_cpu_seconds"] = total, common.cpu_clock() - cpu_start

    for name, sae in saes.items():
        out["members"][name] = common.member_result(
            seconds[name],
            evaluate(sae, heldout),
            losses[name][0].item(),
            losses[name][-1].item(),
            common.changed(before[name], sae.W_enc),
        )
    d = spec["d_in"]
    out["notes"] += [
        f"entry point: sae_lens.SAETrainer.fit (sae-lens {sae_lens.__version__}) with a data_provider iterator over "
        "the spec's rows in file order; one SAETrainer per member" + (" inside MultiSAETrainer" if multi else ""),
        "loss_first/loss_last: TrainStepOutput.loss (SAELens' losses/overall_loss) of the first and last step, "
        "in SAELens units: sum over d_in of the squared error averaged over rows, plus its sparsity/aux terms",
        f"conversions: SAELens' MSE is d_in={d} times ours, so l1_coefficient = l1 * d_in, l0_coefficient = "
        "l0_coefficient * d_in, aux_loss_coefficient = our auxk_coefficient; Adam is scale-invariant, so lr is ours",
        "init: decoder_init_norm=1.0 (unit decoder rows, encoder = transpose, as ours), b_enc = b_dec = 0, "
        "torch.manual_seed(member seed) before building the SAE",
        "always on, not configurable: clip_grad_norm_(params, 1.0) each step (its losses are d_in times ours, "
        "so clipping bites earlier than in an unscaled loss); per-step feature-firing statistics over [batch, dict]",
        "relu: SAELens leaves W_dec unconstrained and weights the L1 by ||W_dec_i|| (same objective as our "
        "unit-norm decoder, reparametrised); jumprelu trains the threshold itself (ours its log) and leaves W_dec free",
    ]
    if arch in ("topk", "batchtopk"):
        out["notes"].append(
            "AuxK: k_aux = d_in // 2 fixed; dead window in steps = round(auxk_dead_tokens / batch_size); "
            "without AuxK, aux_loss_coefficient = 0 and a window longer than training"
        )
    common.write(out_path, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
