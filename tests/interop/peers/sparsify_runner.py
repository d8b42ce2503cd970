"""Train a spec's members with sparsify's own `Trainer`, one SAE after another.

    .interop/sparsify/bin/python tests/interop/peers/sparsify_runner.py SPEC.json OUT.json

Entry point: `sparsify.Trainer(TrainConfig, dataset, model).fit()`, the loop `python -m sparsify` runs.
Its Trainer takes activations only from forward hooks on a model's modules while it runs the model on
a dataset of input_ids, so the "model" here is `ActivationTable`: an embedding table holding our rows,
and the dataset hands it row numbers: one sequence of `batch_size` consecutive rows per step
(batch_size=1 sequence, DataLoader shuffle=False), so step i trains on row block i. The hooked output
is exactly the batch; everything after it (SAE forward, FVU + AuxK loss, Adam, decoder projection and
renormalisation, dead-latent counts) is sparsify's code. One Trainer per member: a Trainer shares one
SparseCoderConfig (k, width) and one lr across its SAEs (only init_seeds may differ).

sparsify trains TopK (and groupmax) SAEs only: relu/L1, batchtopk and jumprelu specs get "unsupported".
"""

from __future__ import annotations

import sys
import tempfile
from importlib.metadata import version

import common  # first: sets TQDM_DISABLE before the library imports tqdm
import sparsify.trainer
import torch
from sparsify import SparseCoderConfig, TrainConfig, Trainer
from torch import nn

UNSUPPORTED = {
    "relu": "sparsify 1.3.3 trains only TopK (and groupmax) sparse coders: it has no ReLU SAE with an L1 penalty",
    "batchtopk": "sparsify 1.3.3 has no BatchTopK activation (only per-row topk and groupmax)",
    "jumprelu": "sparsify 1.3.3 has no JumpReLU activation (only per-row topk and groupmax)",
}


class ActivationTable(nn.Module):
    """Stands in for the transformer sparsify hooks: input_ids are row numbers, the hooked submodule `rows`
    returns those rows of the training file (frozen, so nothing but the SAEs gets gradients)."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = nn.Embedding.from_pretrained(rows, freeze=True)

    @property
    def base_model(self):  # sparsify looks hookpoints up on model.base_model, as on a transformers model
        return self

    @property
    def device(self):
        return self.rows.weight.device

    @property
    def dummy_inputs(self):  # read once by sparsify's resolve_widths to find d_in
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids):
        return self.rows(input_ids)


class RowBlocks(torch.utils.data.Dataset):
    """Item i = the row numbers of batch i, as one sequence."""

    def __init__(self, batch_size: int, steps: int):
        self.batch_size, self.steps = batch_size, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        return {"input_ids": torch.arange(i * self.batch_size, (i + 1) * self.batch_size)}


def constant_schedule(optimizer, num_warmup_steps, num_training_steps):
    """sparsify's Adam path always wraps the optimizer in transformers' linear warm-up + linear decay to zero
    over the run, with no setting to turn the decay off; our runs use a constant lr, so this replaces it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def main(spec_path: str, out_path: str) -> None:
    spec = common.load_spec(spec_path)
    arch, device, d = spec["architecture"], spec["device"], spec["d_in"]
    if arch in UNSUPPORTED:
        common.write(out_path, common.result("sparsify", version("eai-sparsify"), spec, False, UNSUPPORTED[arch]))
        return
    out = common.result("sparsify", version("eai-sparsify"), spec)
    sparsify.trainer.get_linear_schedule_with_warmup = constant_schedule
    rows = common.load_rows(spec["train_rows"], device)
    heldout = common.load_rows(spec["heldout_rows"], device)
    model = ActivationTable(rows)
    dataset = RowBlocks(spec["batch_size"], spec["steps"])
    save_seconds, trained = 0.0, []

    start, cpu_start = common.clock(device), common.cpu_clock()
    with tempfile.TemporaryDirectory() as save_dir:
        for m in spec["members"]:
            t0 = common.clock(device)
            coefficient, dead_rows, k_aux = common.auxk_settings(m, d)
            cfg = TrainConfig(
                SparseCoderConfig(
                    activation="topk",
                    num_latents=m["dict_size"],
                    k=m["k"],
                    normalize_decoder=True,
                    multi_topk=False,
                    skip_connection=False,
                    transcode=False,
                ),
                batch_size=1,
                grad_acc_steps=1,
                micro_acc_steps=1,
                loss_fn="fvu",
                optimizer="adam",
                lr=m["lr"],
                lr_warmup_steps=0,
                k_decay_steps=0,
                auxk_alpha=coefficient,
                # dead = more than this many tokens without firing; ours: none in the last auxk_dead_tokens rows
                dead_feature_threshold=max(dead_rows - 1, 0) if coefficient else 1 << 62,
                # save_every: it saves when (step + 1) % save_every == 0 for step = 1..steps; steps + 2 never divides
                hookpoints=["rows"],
                init_seeds=[m["seed"]],
                save_every=spec["steps"] + 2,
                log_to_wandb=False,
                save_dir=save_dir,
                run_name=m["member_id"],
            )
            trainer = Trainer(cfg, dataset, model)
            (sae,) = trainer.saes.values()
            before = sae.encoder.weight.detach().clone()
            losses = []

            # The loss its loop backpropagates: fvu + auxk_alpha * auxk_loss (multi_topk off), kept unsynced.
            def record(module, args, kwargs, o, losses=losses, alpha=coefficient):
                losses.append((o.fvu + alpha * o.auxk_loss).detach())

            hook = sae.register_forward_hook(record, with_kwargs=True)
            save = trainer.save

            def timed_save(save=save):  # fit() always ends with a checkpoint; time it for the notes
                nonlocal save_seconds
                s0 = common.clock(device)
                save()
                save_seconds += common.clock(device) - s0

            trainer.save = timed_save
            trainer.fit()
            hook.remove()
            trained.append((m["member_id"], sae, before, losses, common.clock(device) - t0))
        out["train_seconds"], out["train_cpu_seconds"] = common.clock(device) - start, common.cpu_clock() - cpu_start

    for member_id, sae, before, losses, seconds in trained:

        def forward(x, sae=sae):
            # encode/decode, not forward(): forward runs under bf16 autocast on CUDA. Codes: the k kept
            # activations per row (ReLU may have zeroed some).
            top_acts, top_indices, _ = sae.encode(x)
            return top_acts, sae.decode(top_acts, top_indices)

        out["members"][member_id] = common.member_result(
            seconds,
            common.heldout_metrics(forward, heldout),
            losses[0].item(),
            losses[-1].item(),
            common.changed(before, sae.encoder.weight),
        )
    out["notes"] += [
        "entry point: sparsify.Trainer(TrainConfig, dataset, model).fit(), one Trainer per member; the model is an "
        "embedding table of the training rows hooked at its output, the dataset yields batch i's row numbers",
        "loss_first/loss_last: fvu + auxk_alpha * auxk_loss (what it backpropagates; fvu = batch SSE / batch total "
        "variance) at the first and last step, read with a forward hook on the SparseCoder",
        "conversions: loss_fn='fvu' = our per-element MSE times B*d_in / (batch variance), a per-batch constant, so "
        "Adam's lr is ours; its AuxK is normalised by the same batch variance, so auxk_alpha = our auxk_coefficient",
        "optimizer='adam' (torch Adam, betas 0.9/0.999; bitsandbytes' 8-bit Adam is used where installed: not in "
        "these venvs), lr_warmup_steps=0; its built-in linear decay to zero replaced by a constant lr (the runner's "
        "only change to its loop: sparsify.trainer.get_linear_schedule_with_warmup)",
        f"always on, not configurable: a checkpoint (SAE, Adam state, config) written at the end of fit() "
        f"({save_seconds:.2f} s over all members, inside train_seconds); b_dec set to the first batch's mean; "
        "a host sync per step (float(fvu), tokens_mask.sum().item()); on CUDA its forward runs under bf16 autocast "
        "and fit() sets float32 matmul precision to 'high' (TF32)",
        "AuxK differs from ours: k_aux = d_in // 2 fixed; dead latents are picked from post-ReLU activations (ours: "
        "pre-activations), and its FusedEncoder backward drops the pre-activation gradient, so AuxK trains only "
        "W_dec, not the encoder",
        "init: nn.Linear's default encoder init, W_dec = encoder rows normalised (ours: unit rows, encoder = their "
        "transpose); torch.manual_seed(member seed) by sparsify before each SAE",
    ]
    if any(m.get("k_aux") and m["k_aux"] != d // 2 for m in spec["members"]):
        out["notes"].append("k_aux asked for differs from d_in // 2, which sparsify hard-codes")
    common.write(out_path, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
