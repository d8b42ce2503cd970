"""N SAEs trained as one: params stacked on a leading member axis, one vmapped step.

State is plain data: `params`, `hparams` and `opt_state` are dicts of tensors whose
first axis is the member, so the ensemble can be sliced, saved and resumed
without special cases.

One step:
  1. per-member schedules give this step's lr [M] and sparsity coefficient [M] (l1 or l0_coefficient;
     a target-L0 member's comes from its controller, steering.py, which folds the step's measured L0 in
     after the step);
  2. every member's gradient on the shared batch: `vmap(grad(loss))` of the members' architecture
     (architectures/; the reference) or, for sae.py's variants, a hand-written kernel equal to it
     (kernels/), as the ensemble's `Execution` says (execution.py; `auto` asks autotune.py);
  3. Adam on the stacked tensors directly, no vmap (Adam is elementwise), the per-member lr broadcast
     over the member axis: kernels/adam.py, one Adam per device whatever computed the gradients (equal
     to torchopt's `scale_by_adam`, the definition the tests hold it to);
  4. decoder rows are rescaled to unit norm (not learned-norm members': sae.effective), and an
     architecture's untrained state (BatchTopK's running threshold) takes its value from the step's aux;
  5. members due to resample (relu, tied with resample_every; resample.py) re-initialise their dead
     features from this batch;
  6. a member whose loss or gradient is not finite skips the step (params and moments
     unchanged); after `freeze_after` such steps in a row it keeps its last finite params
     from then on and is flagged in `alive` (the other members never see it).

Params come from the architecture (architectures.param_shapes): every member of an ensemble has
the same architecture module, so one vmapped loss and one set of stacked tensors serves them all.
Dict sizes mix by padding to the largest with `hparams["feature_mask"]`: padded
features start at zero, never activate and so get exactly zero gradient, and
Adam turns a zero gradient into a zero update, so they stay zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from sae_ensemble import architectures, autotune, kernels, resample, sae
from sae_ensemble import execution as executions
from sae_ensemble.config import ExecutionKind
from sae_ensemble.cuda_graph import GraphedStep
from sae_ensemble.execution import Execution
from sae_ensemble.kernels.adam import AdamState, broadcast
from sae_ensemble.member import Member
from sae_ensemble.schedules import Schedules, per_member

SPARSITY_COEFFICIENTS = ("l1", "l0_coefficient")  # the hparam l1_warmup_steps warms up, whichever the architecture has
COMPILED_SHAPES = 64  # compiled versions of one kernel a process keeps (one per ensemble shape and row chunk)


class Ensemble:
    """Members trained in lockstep on the same batches."""

    def __init__(
        self,
        members: Sequence[Member],
        total_steps: int,
        device: str | torch.device = "cpu",
        autocast_bf16: bool = False,
        *,
        execution: str | Execution = "reference",
        micro_batches: int = 1,
        init: bool = True,
        freeze_after: int = 1,
        cuda_graphs: bool = True,
        compile: bool = False,
    ) -> None:
        """`execution`: a config.ExecutionKind (`auto` tunes on the first batch, autotune.py), or an Execution to
        step with exactly that (rows per kernel call, passes: benchmarks and tests pin one). `micro_batches`
        splits every batch into that many chunks whose gradients are summed (equal to the whole batch; bounds
        the step's temporaries). `init=False` leaves the stacked state zero, for a caller that fills every
        slot with `load_member_state`. `freeze_after`: non-finite steps in a row (each skipped) before a
        member freezes. `cuda_graphs`: replay the fused step as a CUDA graph (CUDA only). `compile`: run the
        kernels (kernels.dense.grads, kernels.adam.step_) through torch.compile, whose generated code fuses
        the elementwise passes between the GEMMs (equal to the eager kernels to float rounding; the first
        step of each shape pays the compilation)."""
        if not members:
            raise ValueError("an ensemble needs at least one member")
        d_ins = {m.d_in for m in members}
        if len(d_ins) != 1:
            raise ValueError(f"members of one ensemble must share d_in; got {sorted(d_ins)}")
        ids = [m.member_id for m in members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate members in one ensemble: {sorted({i for i in ids if ids.count(i) > 1})}")
        auxk, transcoders = any(m.auxk_dead_tokens for m in members), any(m.d_out for m in members)
        kind = execution.kind if isinstance(execution, Execution) else str(execution)
        executions.check(kind, [m.variant for m in members], auxk, autocast_bf16)
        if micro_batches < 1 or freeze_after < 1:
            raise ValueError(f"micro_batches={micro_batches} and freeze_after={freeze_after} must be at least 1")
        self.device = torch.device(device)
        if autocast_bf16 and self.device.type != "cuda":
            raise ValueError(f"autocast_bf16 needs a CUDA device; got device={self.device}")
        self.members = list(members)
        self.total_steps = int(total_steps)
        self.autocast_bf16 = autocast_bf16
        self.kernel_dtype = torch.bfloat16 if autocast_bf16 else torch.float32  # of the fused kernel's GEMM operands
        self.micro_batches = int(micro_batches)
        self.freeze_after = int(freeze_after)
        self.d_in = members[0].d_in
        self.n_padded = max(m.dict_size for m in members)
        self.architecture = architectures.module_for(members)  # raises if members' parameter sets differ
        self.layout = self.architecture.layout(members)
        # `auto` tunes only where a kernel applies: other architectures have the reference alone.
        self.kernels = executions.kernels_for([m.variant for m in members], auxk)
        self.auto = kind == ExecutionKind.auto and bool(self.kernels)
        default = "reference" if kind == ExecutionKind.auto else kind
        fixed = execution if isinstance(execution, Execution) else Execution(default)
        self.execution: Execution | None = None if self.auto else fixed  # None until the first tuning
        self.autotune_report: dict[str, float] = {}  # {candidate: ms per gradient} of the latest tuning

        self.params = self._allocate(init)
        n = self.n_padded
        self.hparams = _stack([architectures.make_hparams(m, n, self.layout) for m in members], self.device)
        self.sparsity_key = next((key for key in SPARSITY_COEFFICIENTS if key in self.hparams), None)
        configured = (
            self.hparams[self.sparsity_key] if self.sparsity_key else torch.zeros(len(members), device=self.device)
        )
        self.schedule = Schedules(members, total_steps, configured)
        self.auxk_dead_tokens = per_member([m.auxk_dead_tokens for m in members], self.device)
        clip = [m.max_grad_norm or float("inf") for m in members]
        self.max_grad_norm = per_member(clip, self.device) if any(m.max_grad_norm for m in members) else None
        # [M, n] rows since each feature last fired (AuxK's dead mask); saved with the moments to resume exactly
        self.tokens_since_fired = torch.zeros(len(members), self.n_padded, device=self.device)
        self.resampling = any(m.resample_every for m in members)
        self.last_resampled: dict[int, int] = {}  # {member index: features} of the latest resample

        self.opt_state = AdamState.zeros_like(self.params)
        unit = [not m.learned_decoder_norm for m in members]  # whose rows Adam renormalises
        self._unit = torch.tensor(unit, device=self.device) if any(unit) and not all(unit) else all(unit)
        self.alive = torch.ones(len(members), dtype=torch.bool, device=self.device)
        self.nonfinite_streak = torch.zeros(len(members), dtype=torch.int64, device=self.device)  # [M] in a row
        self.step_count = 0
        self._device_step = torch.zeros((), device=self.device)  # step_count on the device, read by the step itself
        self._graphs = GraphedStep(self.device) if cuda_graphs and self.device.type == "cuda" else None
        self.rows_seen = 0

        self._dense_grads, self._adam_step = kernels.dense.grads, kernels.adam.step_
        self.compiled = compile
        if compile:
            # One code object serves every ensemble a worker trains: allow a compiled version per shape.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
            self._dense_grads = torch.compile(kernels.dense.grads, dynamic=False)
            self._adam_step = torch.compile(kernels.adam.step_, dynamic=False)
        # Adam decides on the host who steps (CPU, eager) or selects on the device (CUDA, compiled): in a
        # compiled step, a host read in Adam's loop makes dynamo give up on the whole frame and run it eagerly.
        self._check_on_host = self.device.type != "cuda" and not compile

        arch = self.architecture
        grad_fn = torch.func.grad(arch.loss, has_aux=True)
        self._grad = torch.func.vmap(lambda p, h, x: grad_fn(p, h, x, self.layout), in_dims=(0, 0, None))
        self._forward = torch.func.vmap(
            lambda p, h, x: _encode_decode(arch, p, h, x, self.layout, transcoders), in_dims=(0, 0, None)
        )

    def _allocate(self, init: bool) -> dict[str, torch.Tensor]:
        """Stacked params allocated on the device, each member's init generated and copied in
        alone, so host memory holds one member's init at a time, never the whole stack."""
        first = self.members[0]
        shapes = architectures.param_shapes(
            self.architecture, self.d_in, self.n_padded, first.d_out, first.skip_connection
        )
        params = {name: torch.zeros(len(self.members), *shape, device=self.device) for name, shape in shapes.items()}
        if init:
            for index, member in enumerate(self.members):
                for name, value in architectures.init_params(member).items():
                    _fill(params[name][index], value)
        return params

    def __len__(self) -> int:
        return len(self.members)

    def schedules(self, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr [M], sparsity coefficient [M]) at `step` (schedules.py)."""
        return self.schedule.at(step)

    def with_sparsity(self, coefficient: torch.Tensor) -> dict[str, torch.Tensor]:
        """The hparams of this step: its sparsity coefficient [M] (see `schedules`) and, for AuxK, the dead
        features [M, n] (no firing in the member's last auxk_dead_tokens rows)."""
        hparams = {**self.hparams, self.sparsity_key: coefficient} if self.sparsity_key else dict(self.hparams)
        if "dead" in hparams:
            limit = self.auxk_dead_tokens.unsqueeze(1)
            hparams["dead"] = ((self.tokens_since_fired >= limit) & (limit > 0)).float() * self.hparams["feature_mask"]
        return hparams

    # -- training --------------------------------------------------------------

    @property
    def choice(self) -> str:
        """What the step runs, as the autotuner names it (`auto` before the first tuning)."""
        return self.execution.describe() if self.execution else str(ExecutionKind.auto)

    def grads(
        self, batch: torch.Tensor, hparams: dict[str, torch.Tensor], execution: Execution | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(gradients, aux stats) of every member's loss on `batch`, by `execution` (default: the ensemble's).

        Pure: reads the params, changes nothing. Micro-batches are weighted by their share
        of rows, so their sum is the whole batch's gradient (the bias-decay term too, since
        the weights sum to 1).
        """
        execution = execution or self.execution or executions.REFERENCE
        if execution.kind != "reference":
            return self._kernel_grads(batch, hparams, execution)
        if self.micro_batches == 1:
            return self._reference(batch, hparams)
        total, total_aux = {}, {}  # the parts' sums
        for part in batch.tensor_split(self.micro_batches):
            weight = part.shape[0] / batch.shape[0]
            grads, aux = self._reference(part, hparams)
            for tree, out in ((grads, total), (aux, total_aux)):
                for name, value in tree.items():
                    if name == "min_kept":  # a minimum over the rows is the minimum of the parts'
                        out[name] = torch.minimum(out[name], value) if name in out else value
                        continue
                    value = value if name == "fired" else value * weight  # firing counts add up
                    out[name] = out[name] + value if name in out else value
        return total, total_aux

    def _kernel_grads(self, batch: torch.Tensor, hparams: dict[str, torch.Tensor], execution: Execution):
        """A kernel's gradients; learned-norm members' through sae.effective (the kernels assume unit rows)."""
        params, scales = self.params, None
        if getattr(self.layout, "learned_norm", False):
            scales = sae.decoder_scales(params, hparams)
            params = sae.effective(params, hparams, self.layout, scales)
        chunk = execution.row_chunk or -(-batch.shape[0] // self.micro_batches)
        if execution.kind == "sparse":
            grads, aux = kernels.sparse.grads(params, hparams, batch, self.layout, row_chunk=chunk)
        else:
            grads, aux = self._dense_grads(
                params, hparams, batch, self.layout, row_chunk=chunk, dtype=self.kernel_dtype, passes=execution.passes
            )
        return grads if scales is None else sae.effective_backward(self.params, hparams, grads, scales), aux

    def _reference(self, batch: torch.Tensor, hparams: dict[str, torch.Tensor]):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast_bf16 else contextlib.nullcontext()
        with autocast:
            grads, aux = self._grad(self.params, hparams, batch)
        return {name: g.float() for name, g in grads.items()}, aux

    def autotune(self, batch: torch.Tensor) -> Execution:
        """Time each execution that applies here on `batch` and step with the fastest from now on (autotune.py;
        changes no training state); returns it."""
        hparams = self.with_sparsity(self.schedules(self.step_count)[1])
        shape = autotune.Shape(
            self.device,
            len(self),
            self.n_padded,
            -(-batch.shape[0] // self.micro_batches),
            self.kernel_dtype,
            self.compiled,
            self.layout.all_topk,
            self.kernels,
        )
        self.execution, self.autotune_report = autotune.tune(
            lambda candidate: self.grads(batch, hparams, candidate)[1], shape, self.hparams["feature_mask"].sum(-1)
        )
        return self.execution

    def step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step of every member on `batch` [B, d_in]; returns per-member stats [M].

        On CUDA the fused step is captured once as a CUDA graph and replayed (cuda_graph.py); the stats
        returned then live in the graph's buffers until the next step.
        """
        if self._tunes_now():
            self.autotune(batch)
            if self._graphs:
                self._graphs.drop()
        if self._graphed():
            stats = self._graphs(self._step, batch)
        else:
            stats = self._step(batch)
        self.step_count += 1
        self.rows_seen += batch.shape[0]
        if self.resampling and (due := resample.due(self)):
            self.last_resampled = resample.resample_dead_(self, batch, due)
        return stats

    def _tunes_now(self) -> bool:
        return self.auto and (self.execution is None or self.step_count % autotune.RETUNE_EVERY == 0)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the fused step runs as a CUDA graph here (CUDA, asked for, and no capture failed)."""
        return self._graphs is not None and not self._graphs.failed

    @property
    def graph_captured(self) -> bool:
        return self._graphs is not None and self._graphs.graph is not None

    def _graphed(self) -> bool:
        return self.cuda_graphs and self.execution is not None and self.execution.kind == "fused"

    def _step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step on the device. No host reads on CUDA and every state update in place, so it can be
        captured as a CUDA graph (cuda_graph.py): the step number is the device tensor `_device_step`."""
        lr, coefficient = self.schedules(self._device_step)
        grads, aux = self.grads(batch, self.with_sparsity(coefficient))
        ok = self.alive & torch.isfinite(aux["loss"])
        step = self._device_step
        options = {"check_on_host": self._check_on_host, "unit": self._unit, "max_grad_norm": self.max_grad_norm}
        taken = self._adam_step(self.params, grads, self.opt_state, step + 1, lr, ok, **options)
        with torch.no_grad():  # a member that skipped the step keeps its counts, as its params
            fired = torch.nan_to_num(aux["fired"]) > 0
            since = torch.where(fired, 0.0, self.tokens_since_fired + batch.shape[0])
            self.tokens_since_fired.copy_(torch.where(taken.unsqueeze(1), since, self.tokens_since_fired))
        if hasattr(self.architecture, "update_state"):
            with torch.no_grad():
                for name, value in self.architecture.update_state(self.params, self.hparams, aux).items():
                    self.params[name].copy_(torch.where(broadcast(taken, value), value, self.params[name]))
        # A live member that could not step skips it; freeze_after such steps in a row freeze it for good.
        self.nonfinite_streak.copy_(torch.where(self.alive & ~taken, self.nonfinite_streak + 1, 0))
        self.alive &= self.nonfinite_streak < self.freeze_after
        self.schedule.learn(aux["l0"], taken, step)
        self._device_step.add_(1)
        return {**aux, "lr": lr, "l1": coefficient, "alive": self.alive}

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [M, B, n_padded], x_hat [M, B, d]) of every member on `batch` [B, d] (transcoders: x_hat is the
        predicted target [M, B, d_out] of the batch [x | y])."""
        return self._forward(self.params, self.hparams, batch)

    @torch.no_grad()
    def decoders(self) -> torch.Tensor:
        """Every member's unit-norm dictionary [M, n_padded, d] (transcoders: of the output, d_out; padded rows are
        zero)."""
        return torch.func.vmap(lambda p, h: self.architecture.decoder(p, h, self.layout))(self.params, self.hparams)

    # -- plain-data views ------------------------------------------------------

    def member_state(self, index: int, folded: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(params, optimizer moments) of one member, unpadded, on CPU.

        W_dec is the member's unit-norm dictionary (for tied members, the normalised encoder), so every saved SAE
        decodes the same way; `folded`: a learned-norm member's norms too (sae.folded; checkpoints keep them).
        """
        member = self.members[index]
        params = {name: p[index].detach().cpu().clone() for name, p in self.params.items()}
        hp = {name: h[index].cpu() for name, h in self.hparams.items()}
        if member.variant == "tied":  # stored W_dec rows are already unit norm; renormalising would perturb a resume
            params["W_dec"] = sae.decoder(params, hp, sae.layout([member]))
        if folded and member.learned_decoder_norm:
            params = sae.folded(params, hp, sae.layout([member]))
        params = architectures.unpad(self.architecture, params, member.dict_size)
        moments = {}
        for prefix, tree in (("mu", self.opt_state.mu), ("nu", self.opt_state.nu)):
            cut = architectures.unpad(
                self.architecture, {name: value[index].detach().cpu() for name, value in tree.items()}, member.dict_size
            )
            moments.update({f"{prefix}.{name}": value.clone() for name, value in cut.items()})
        moments["state.tokens_since_fired"] = self.tokens_since_fired[index, : member.dict_size].cpu().clone()
        return params, moments

    def load_member_state(
        self, index: int, params: dict[str, torch.Tensor], moments: dict[str, torch.Tensor] | None
    ) -> None:
        """Put one member's saved params (and moments, to resume) into slot `index`, zero-padded."""
        slots = [(self.params[name], value) for name, value in params.items()]
        if moments is not None:
            for key, value in moments.items():
                prefix, name = key.split(".", 1)
                if key == "state.tokens_since_fired":
                    slots.append((self.tokens_since_fired, value))
                else:
                    slots.append((getattr(self.opt_state, prefix)[name], value))
        for stacked, value in slots:
            slot = stacked[index]
            slot.zero_()
            _fill(slot, value)

    def set_step(self, step: int, rows_seen: int) -> None:
        """Restore the step counters (Adam's bias correction reads `_device_step` too)."""
        self.step_count = int(step)
        self.rows_seen = int(rows_seen)
        self._device_step.fill_(int(step))


def _encode_decode(architecture, params, hp, batch, layout, transcoders: bool):
    """(codes, output) of one member on a batch: an SAE's reconstruction of it; a transcoder's prediction of its
    target from its input ([x | y], sae.split)."""
    if not transcoders:  # every architecture's SAEs (gated's layout has no target_at: it has no transcoders)
        codes = architecture.encode(params, hp, batch, layout)
        return codes, architecture.decode(params, hp, codes, layout)
    x, _ = sae.split(batch, layout)
    codes = architecture.encode(params, hp, x, layout)
    return codes, architecture.decode(params, hp, codes, layout, x)


def _fill(slot: torch.Tensor, value: torch.Tensor) -> None:
    """Copy one member's `value` into the start of its padded `slot` (any rank, 0-d included)."""
    slot[tuple(slice(0, size) for size in value.shape)] = value.to(slot.device)


def _stack(trees: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.stack([tree[name] for tree in trees]).to(device) for name in trees[0]}
