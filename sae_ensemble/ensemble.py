"""N SAEs trained as one: params stacked on a leading member axis, one vmapped step.

State is plain data: `params`, `hparams` and `opt_state` are dicts of tensors whose
first axis is the member, so the ensemble can be sliced, saved and resumed
without special cases.

One step:
  1. per-member schedules give this step's lr [M] and l1 [M];
  2. `vmap(grad(sae.loss))` computes every member's gradient on the shared batch;
  3. torchopt's Adam moment update runs on the stacked tensors directly, no vmap
     (Adam is elementwise; vmapping it hits torchopt's slow fallback path), and the
     per-member lr broadcasts over the member axis;
  4. decoder rows are rescaled to unit norm;
  5. a member whose loss or new weights are not finite skips the step (params and
     moments unchanged); after `freeze_after` such steps in a row it keeps its last
     finite params from then on and is flagged in `alive` (the other members never see it).

Dict sizes mix by padding to the largest with `hparams["feature_mask"]`: padded
features start at zero, never activate and so get exactly zero gradient, and
Adam turns a zero gradient into a zero update, so they stay zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchopt

from sae_ensemble import sae
from sae_ensemble.member import Member

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _per_member(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


def _broadcast(per_member: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[M] -> [M, 1, ...] so it broadcasts against a stacked tensor."""
    return per_member.view(-1, *([1] * (like.dim() - 1)))


class Ensemble:
    """Members trained in lockstep on the same batches."""

    def __init__(
        self,
        members: Sequence[Member],
        total_steps: int,
        device: str | torch.device = "cpu",
        autocast_bf16: bool = False,
        freeze_after: int = 1,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        d_ins = {m.d_in for m in members}
        if len(d_ins) != 1:
            raise ValueError(f"members of one ensemble must share d_in; got {sorted(d_ins)}")
        ids = [m.member_id for m in members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate members in one ensemble: {sorted({i for i in ids if ids.count(i) > 1})}")
        self.device = torch.device(device)
        if autocast_bf16 and self.device.type != "cuda":
            raise ValueError(f"autocast_bf16 needs a CUDA device; got device={self.device}")
        if freeze_after < 1:
            raise ValueError(f"freeze_after={freeze_after} must be at least 1 (consecutive non-finite steps before a member freezes)")
        self.freeze_after = int(freeze_after)
        self.members = list(members)
        self.total_steps = int(total_steps)
        self.autocast_bf16 = autocast_bf16
        self.d_in = members[0].d_in
        self.n_padded = max(m.dict_size for m in members)
        self.layout = sae.Layout.of([m.variant for m in members], [m.k for m in members])

        n = self.n_padded
        self.params = _stack([sae.init_params(m.variant, m.d_in, m.dict_size, m.seed, n) for m in members], self.device)
        self.hparams = _stack(
            [sae.make_hparams(m.variant, m.dict_size, m.l1, m.bias_decay, m.k, m.use_b_dec, n) for m in members],
            self.device,
        )
        self.lr = _per_member([m.lr for m in members], self.device)
        self.lr_warmup = _per_member([m.lr_warmup_steps for m in members], self.device)
        self.lr_decay = _per_member([m.lr_decay_steps for m in members], self.device)
        self.l1_warmup = _per_member([m.l1_warmup_steps for m in members], self.device)

        self.optimizer = torchopt.transform.scale_by_adam(b1=ADAM_BETAS[0], b2=ADAM_BETAS[1], eps=ADAM_EPS)
        self.opt_state = self.optimizer.init(self.params)
        self.alive = torch.ones(len(members), dtype=torch.bool, device=self.device)
        self.nonfinite_streak = torch.zeros(len(members), dtype=torch.int64, device=self.device)  # [M] non-finite steps in a row
        self.step_count = 0
        self.rows_seen = 0

        grad_fn = torch.func.grad(sae.loss, has_aux=True)
        self._grad = torch.func.vmap(lambda p, h, x: grad_fn(p, h, x, self.layout), in_dims=(0, 0, None))
        self._forward = torch.func.vmap(lambda p, h, x: _encode_decode(p, h, x, self.layout), in_dims=(0, 0, None))

    def __len__(self) -> int:
        return len(self.members)

    # -- schedules -------------------------------------------------------------

    def schedules(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr [M], l1 [M]) at `step` (0-based): linear warmups and an optional linear lr decay to 0."""
        s = float(step)
        lr_factor = torch.clamp((s + 1) / self.lr_warmup.clamp(min=1), max=1.0)
        steps_left = float(self.total_steps - step)
        decay_factor = torch.where(self.lr_decay > 0, torch.clamp(steps_left / self.lr_decay.clamp(min=1), max=1.0), 1.0)
        l1_factor = torch.clamp((s + 1) / self.l1_warmup.clamp(min=1), max=1.0)
        return self.lr * lr_factor * decay_factor, self.hparams["l1"] * l1_factor

    # -- training --------------------------------------------------------------

    def step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step of every member on `batch` [B, d_in]; returns per-member stats [M]."""
        lr, l1 = self.schedules(self.step_count)
        hparams = {**self.hparams, "l1": l1}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast_bf16 else contextlib.nullcontext()
        with autocast:
            grads, aux = self._grad(self.params, hparams, batch)

        # With freeze_after=1 moments update in place: a diverged member's moments are never
        # used again (its params stay frozen), so they need no copy to roll back, only its
        # params do. A member allowed to skip a step and go on needs its old moments back.
        old_state = self.opt_state
        directions, self.opt_state = self.optimizer.update(grads, self.opt_state, inplace=self.freeze_after == 1)
        new_params = {name: torch.addcmul(p, _broadcast(lr, p), directions[name], value=-1) for name, p in self.params.items()}
        new_params["W_dec"] = F.normalize(new_params["W_dec"], dim=-1)

        # A step is taken only if the loss and every new weight are finite. A NaN or inf
        # gradient makes Adam's update NaN, so checking the new weights covers the
        # gradients; a sum per member is one reduction, and NaN/inf survive it.
        finite = torch.isfinite(aux["loss"])
        for tensor in new_params.values():
            finite &= torch.isfinite(tensor.flatten(1).sum(1))
        # A non-finite step is skipped; freeze_after of them in a row freeze the member for good.
        streak = torch.where(finite, 0, self.nonfinite_streak + 1)
        alive = self.alive & (streak < self.freeze_after)
        take = alive & finite  # [M] members whose step is kept

        # A skipped or frozen member keeps its last finite params; the others take the step.
        # On CPU, checking first skips a full pass per tensor in the usual all-taken case; on
        # CUDA that check would stall the queue every step, so select always.
        if self.device.type == "cuda" or not bool(take.all()):
            new_params = {n: torch.where(_broadcast(take, p), new_params[n], p) for n, p in self.params.items()}
            if self.freeze_after > 1:  # skipped members keep their moments (Adam's shared step count still advances)
                mu = {n: torch.where(_broadcast(take, old), self.opt_state.mu[n], old) for n, old in old_state.mu.items()}
                nu = {n: torch.where(_broadcast(take, old), self.opt_state.nu[n], old) for n, old in old_state.nu.items()}
                self.opt_state = self.opt_state._replace(mu=mu, nu=nu)
        self.params, self.alive, self.nonfinite_streak = new_params, alive, streak
        self.step_count += 1
        self.rows_seen += batch.shape[0]
        return {**aux, "lr": lr, "alive": alive}

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [M, B, n_padded], x_hat [M, B, d]) of every member on `batch` [B, d]."""
        return self._forward(self.params, self.hparams, batch)

    @torch.no_grad()
    def decoders(self) -> torch.Tensor:
        """Every member's unit-norm dictionary [M, n_padded, d] (padded rows are zero)."""
        return torch.func.vmap(lambda p, h: sae.decoder(p, h, self.layout))(self.params, self.hparams)

    # -- plain-data views ------------------------------------------------------

    def member_state(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(params, optimizer moments) of one member, unpadded, on CPU.

        W_dec is the member's unit-norm dictionary (for tied members, the
        normalised encoder), so every saved SAE decodes the same way.
        """
        member = self.members[index]
        n = member.dict_size
        params = {name: p[index].detach().cpu().clone() for name, p in self.params.items()}
        hp = {name: h[index].cpu() for name, h in self.hparams.items()}
        if member.variant == "tied":  # stored W_dec rows are already unit norm; renormalising would perturb a resume
            params["W_dec"] = sae.decoder(params, hp, sae.Layout.of([member.variant], [member.k]))
        for name in ("W_enc", "b_enc", "W_dec"):
            params[name] = params[name][:n].contiguous()
        moments = {}
        for prefix, tree in (("mu", self.opt_state.mu), ("nu", self.opt_state.nu)):
            for name, value in tree.items():
                value = value[index].detach().cpu()
                moments[f"{prefix}.{name}"] = (value[:n] if name != "b_dec" else value).contiguous().clone()
        return params, moments

    def load_member_state(self, index: int, params: dict[str, torch.Tensor], moments: dict[str, torch.Tensor] | None) -> None:
        """Put one member's saved params (and moments, to resume) into slot `index`, zero-padded."""
        slots = [(self.params[name], value) for name, value in params.items()]
        if moments is not None:
            for key, value in moments.items():
                prefix, name = key.split(".", 1)
                slots.append((getattr(self.opt_state, prefix)[name], value))
        for stacked, value in slots:
            slot = stacked[index]
            slot.zero_()
            slot[: value.shape[0]] = value.to(self.device)

    def set_step(self, step: int, rows_seen: int) -> None:
        """Restore the step counters (the Adam bias correction counts steps too)."""
        self.step_count = int(step)
        self.rows_seen = int(rows_seen)
        for name, count in self.opt_state.count.items():
            self.opt_state.count[name] = torch.full_like(count, int(step))


def _encode_decode(params, hp, x, layout):
    codes = sae.encode(params, hp, x, layout)
    return codes, sae.decode(params, hp, codes, layout)


def _stack(trees: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.stack([tree[name] for tree in trees]).to(device) for name in trees[0]}
