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
     (kernels/, chosen by `execution`);
  3. Adam on the stacked tensors directly, no vmap (Adam is elementwise; vmapping
     torchopt's hits its slow fallback path), the per-member lr broadcast over the member
     axis: torchopt's for the reference, kernels/adam.py (equal, cache-chunked) for the kernels;
  4. decoder rows are rescaled to unit norm, and an architecture's untrained state (BatchTopK's
     running threshold) takes its new value from the step's aux outputs;
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
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchopt

from sae_ensemble import architectures, autotune, kernels, resample, sae, steering
from sae_ensemble.kernels.adam import broadcast
from sae_ensemble.member import Member

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _per_member(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


SPARSITY_COEFFICIENTS = ("l1", "l0_coefficient")  # the hparam l1_warmup_steps warms up, whichever the architecture has
COMPILED_SHAPES = 64  # compiled versions of one kernel a process keeps (one per ensemble shape and row chunk)
EXECUTIONS = ("auto", "reference", "fused", "sparse")
"""How a step computes gradients: `reference` is vmap(grad(sae.loss)), the definition; `fused`
and `sparse` are the hand-written kernels (kernels/, docs/kernels.md), equal to it; `auto`
times the candidates on the first batch, and again every autotune.RETUNE_EVERY steps, and keeps
the fastest (autotune.py)."""


class Ensemble:
    """Members trained in lockstep on the same batches."""

    def __init__(
        self,
        members: Sequence[Member],
        total_steps: int,
        device: str | torch.device = "cpu",
        autocast_bf16: bool = False,
        *,
        execution: str = "reference",
        micro_batches: int = 1,
        init: bool = True,
        freeze_after: int = 1,
        cuda_graphs: bool = True,
        compile: bool = False,
    ) -> None:
        """`micro_batches` splits every batch into that many chunks whose gradients are summed
        (equal to the whole batch; bounds the step's temporaries). `init=False` leaves the
        stacked state zero, for a caller that fills every slot with `load_member_state`.
        `freeze_after`: non-finite steps in a row (each skipped) before a member freezes.
        `cuda_graphs`: replay the fused step as a CUDA graph (CUDA only). `compile`: run the kernels
        (kernels.dense.grads, kernels.adam.step_) through torch.compile, whose generated code fuses the
        elementwise passes between the GEMMs (equal to the eager kernels to float rounding; the first
        step of each shape pays the compilation)."""
        if not members:
            raise ValueError("an ensemble needs at least one member")
        d_ins = {m.d_in for m in members}
        if len(d_ins) != 1:
            raise ValueError(f"members of one ensemble must share d_in; got {sorted(d_ins)}")
        ids = [m.member_id for m in members]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate members in one ensemble: {sorted({i for i in ids if ids.count(i) > 1})}")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution={execution!r} is unknown; allowed: {', '.join(EXECUTIONS)}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches} must be at least 1")
        if freeze_after < 1:
            raise ValueError(f"freeze_after={freeze_after} must be at least 1 (consecutive non-finite steps before a member freezes)")
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
        kernels_apply = self.architecture is sae and not getattr(self.layout, "k_aux", 0)
        if execution in ("fused", "sparse") and not kernels_apply:
            raise ValueError(f"execution={execution!r} implements variants {', '.join(architectures.KERNEL_VARIANTS)} without AuxK only; "
                             f"these members ({sorted({m.variant for m in members})}, AuxK on: {any(m.auxk_dead_tokens for m in members)}) "
                             "need execution='reference' or 'auto'")
        if execution == "auto" and not kernels_apply:
            execution = "reference"  # the only execution for other architectures: nothing to tune
        if execution == "sparse" and autocast_bf16:
            raise ValueError("execution='sparse' runs in float32; bf16 autocast uses execution='fused', 'reference' or 'auto'")
        self.execution = execution
        self.retune = execution == "auto"  # re-time the candidates every autotune.RETUNE_EVERY steps
        self.row_chunk: int | None = None  # rows per kernel call (None: the whole micro-batch); set by autotune
        self.passes: str | None = None  # where the fused kernel works between its GEMMs (kernels.dense.PASSES; None: its default); set by autotune
        self.autotune_report: dict[str, float] = {}
        self.choice = execution  # what the step runs, as the autotuner names it

        self.params = self._allocate(init)
        n = self.n_padded
        self.hparams = _stack([architectures.make_hparams(m, n, self.layout) for m in members], self.device)
        self.sparsity_key = next((key for key in SPARSITY_COEFFICIENTS if key in self.hparams), None)
        self.lr = _per_member([m.lr for m in members], self.device)
        self.lr_warmup = _per_member([m.lr_warmup_steps for m in members], self.device)
        self.lr_decay = _per_member([m.lr_decay_steps for m in members], self.device)
        self.l1_warmup = _per_member([m.l1_warmup_steps for m in members], self.device)
        self.auxk_dead_tokens = _per_member([m.auxk_dead_tokens for m in members], self.device)
        # [M, n] rows since each feature last fired (AuxK's dead mask); saved with the moments to resume exactly
        self.tokens_since_fired = torch.zeros(len(members), self.n_padded, device=self.device)
        self.resampling = any(m.resample_every for m in members)
        self.last_resampled: dict[int, int] = {}  # {member index: features} of the latest resample
        self.target_l0 = _per_member([m.target_l0 if m.variant in steering.STEERABLE else 0.0 for m in members], self.device)
        self.steered = self.target_l0 > 0  # [M] members whose coefficient the controller sets
        self.controller = steering.init_state(self._base_coefficient())  # [M] tensors, updated in place by the step

        self.optimizer = torchopt.transform.scale_by_adam(b1=ADAM_BETAS[0], b2=ADAM_BETAS[1], eps=ADAM_EPS)
        self.opt_state = self.optimizer.init(self.params)
        self.alive = torch.ones(len(members), dtype=torch.bool, device=self.device)
        self.nonfinite_streak = torch.zeros(len(members), dtype=torch.int64, device=self.device)  # [M] non-finite steps in a row
        self.step_count = 0
        self._device_step = torch.zeros((), device=self.device)  # step_count on the device, read by the step itself
        self.cuda_graphs = cuda_graphs
        # The stream this ensemble's graph is warmed up on, captured on and (stage.py) may replay on. Graphs
        # captured on one stream share its cuBLAS workspace (pytorch/pytorch#193402): two ensembles' graphs
        # could not then run side by side, and re-capturing one (a re-tune) could free the other's workspace.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_warm = False
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
        self._forward = torch.func.vmap(lambda p, h, x: _encode_decode(arch, p, h, x, self.layout), in_dims=(0, 0, None))

    def _allocate(self, init: bool) -> dict[str, torch.Tensor]:
        """Stacked params allocated on the device, each member's init generated and copied in
        alone, so host memory holds one member's init at a time, never the whole stack."""
        shapes = architectures.param_shapes(self.architecture, self.d_in, self.n_padded)
        params = {name: torch.zeros(len(self.members), *shape, device=self.device) for name, shape in shapes.items()}
        if init:
            for index, member in enumerate(self.members):
                for name, value in architectures.init_params(member).items():
                    _fill(params[name][index], value)
        return params

    def __len__(self) -> int:
        return len(self.members)

    # -- schedules -------------------------------------------------------------

    def schedules(self, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr [M], sparsity coefficient [M]) at `step` (0-based; an int or a 0-d tensor on the device): linear
        warmups and an optional linear lr decay to 0. The coefficient is the architecture's l1 or l0_coefficient
        (zeros for architectures with neither, which take no sparsity penalty). A steered member's
        coefficient is its controller's."""
        s = torch.as_tensor(step, dtype=torch.float32, device=self.device)
        lr_factor = torch.clamp((s + 1) / self.lr_warmup.clamp(min=1), max=1.0)
        steps_left = self.total_steps - s
        decay_factor = torch.where(self.lr_decay > 0, torch.clamp(steps_left / self.lr_decay.clamp(min=1), max=1.0), 1.0)
        l1_factor = torch.clamp((s + 1) / self.l1_warmup.clamp(min=1), max=1.0)
        coefficient = torch.where(self.steered, steering.coefficients(self.controller, self.target_l0), self._base_coefficient())
        return self.lr * lr_factor * decay_factor, coefficient * l1_factor

    def _base_coefficient(self) -> torch.Tensor:
        """[M] the architecture's sparsity coefficient as configured (zeros where it has none)."""
        return self.hparams[self.sparsity_key] if self.sparsity_key else torch.zeros_like(self.lr)

    def with_sparsity(self, coefficient: torch.Tensor) -> dict[str, torch.Tensor]:
        """The hparams of this step: its sparsity coefficient [M] (see `schedules`) and, for AuxK, the dead
        features [M, n] (no firing in the member's last auxk_dead_tokens rows)."""
        hparams = {**self.hparams, self.sparsity_key: coefficient} if self.sparsity_key else dict(self.hparams)
        if "dead" in hparams:
            limit = self.auxk_dead_tokens.unsqueeze(1)
            hparams["dead"] = ((self.tokens_since_fired >= limit) & (limit > 0)).float() * self.hparams["feature_mask"]
        return hparams

    # -- training --------------------------------------------------------------

    def grads(self, batch: torch.Tensor, hparams: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(gradients, aux stats) of every member's loss on `batch`, by this ensemble's execution.

        Pure: reads the params, changes nothing. Micro-batches are weighted by their share
        of rows, so their sum is the whole batch's gradient (the bias-decay term too, since
        the weights sum to 1).
        """
        chunk = self.row_chunk or -(-batch.shape[0] // self.micro_batches)
        if self.execution == "sparse":
            return kernels.sparse.grads(self.params, hparams, batch, self.layout, row_chunk=chunk)
        if self.execution == "fused":
            return self._dense_grads(self.params, hparams, batch, self.layout, row_chunk=chunk, dtype=self.kernel_dtype,
                                     passes=self.passes)
        if self.micro_batches == 1:
            return self._reference(batch, hparams)
        total: dict[str, torch.Tensor] = {}
        total_aux: dict[str, torch.Tensor] = {}
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

    def _reference(self, batch: torch.Tensor, hparams: dict[str, torch.Tensor]):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast_bf16 else contextlib.nullcontext()
        with autocast:
            grads, aux = self._grad(self.params, hparams, batch)
        return {name: g.float() for name, g in grads.items()}, aux

    def autotune(self, batch: torch.Tensor) -> str:
        """Time each execution that applies here on `batch`, keep the fastest and return its name
        (autotune.py; changes no training state)."""
        return autotune.tune(self, batch)

    def step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step of every member on `batch` [B, d_in]; returns per-member stats [M].

        On CUDA the fused step is captured once as a CUDA graph and replayed: launching its
        ~200 small kernels one by one from Python kept the GPU waiting on the host (measured on
        an H100). The stats returned then live in the graph's buffers until the next step.
        """
        if self._tunes_now():
            self.autotune(batch)
            self._graph = None
        if self._graphed():
            stats = self._graphed_step(batch)
        else:
            stats = self._step(batch)
        self.step_count += 1
        self.rows_seen += batch.shape[0]
        if self.resampling and (due := resample.due(self)):
            self.last_resampled = resample.resample_dead_(self, batch, due)
        return stats

    def _tunes_now(self) -> bool:
        return self.execution == "auto" or (self.retune and self.step_count % autotune.RETUNE_EVERY == 0)

    def _graphed(self) -> bool:
        """Whether the step runs as a CUDA graph (`_graphed_step`)."""
        return self.cuda_graphs and self.device.type == "cuda" and self.execution == "fused"

    def _graph_fits(self, batch: torch.Tensor) -> bool:
        """Whether a graph is captured for a batch of this shape."""
        return self._graph is not None and batch.shape == self._graph_batch.shape

    def replays(self, batch: torch.Tensor) -> bool:
        """Whether the next `step(batch)` only copies the batch in and replays the captured CUDA graph: no
        tuning, capture, resampling or other host work, so stage.py may run it on `self.stream`."""
        return not self._tunes_now() and self._graphed() and self._graph_fits(batch) and not self.resampling

    def _step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step on the device. No host reads on CUDA and every state update in place, so it can be
        captured as a CUDA graph: the step number is the device tensor `_device_step`."""
        lr, coefficient = self.schedules(self._device_step)
        grads, aux = self.grads(batch, self.with_sparsity(coefficient))
        ok = self.alive & torch.isfinite(aux["loss"])
        if self.execution in ("fused", "sparse"):
            taken = self._adam_step(self.params, grads, self.opt_state.mu, self.opt_state.nu, self._device_step + 1, lr, ok,
                                       ADAM_BETAS, ADAM_EPS, check_on_host=self._check_on_host)
            for count in self.opt_state.count.values():
                count.add_(1)
        else:
            taken = self._reference_update(grads, lr, ok)
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
        # The controller learns only from steps taken at the full coefficient (after any l1 warmup).
        steering.update_(self.controller, aux["l0"], self.target_l0, self.steered & taken & (self._device_step + 1 >= self.l1_warmup))
        self._device_step.add_(1)
        return {**aux, "lr": lr, "l1": coefficient, "alive": self.alive}

    def _graphed_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """`_step` as a replayed CUDA graph: one eager step on a side stream first (cuBLAS sets up
        its workspaces), then a capture, then replays. A capture that fails falls back to eager steps."""
        if self._graph_fits(batch):
            self._graph_batch.copy_(batch)
            self._graph.replay()
            return self._graph_stats
        side = self.stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        if not self._graph_warm:
            with torch.cuda.stream(side):
                stats = self._step(batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._graph_warm = True
            return stats
        graph, static_batch = torch.cuda.CUDAGraph(), batch.clone()
        try:
            with torch.cuda.graph(graph, stream=side):
                static_stats = self._step(static_batch)
        except RuntimeError as error:  # an op that cannot be captured: train eagerly, say so once
            warnings.warn(f"CUDA graph capture of the fused step failed ({error}); stepping eagerly")
            self.cuda_graphs = False
            return self._step(batch)
        self._graph, self._graph_batch, self._graph_stats = graph, static_batch, static_stats
        self._graph.replay()  # capturing recorded the step; replaying runs it
        return self._graph_stats

    @torch.no_grad()
    def _reference_update(self, grads: dict[str, torch.Tensor], lr: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """torchopt's Adam on the stacked tensors (no vmap: Adam is elementwise), then the step.

        Returns taken [M]: members in `ok` whose gradient is finite (a NaN or inf anywhere
        survives a per-member sum). The others keep their params and moments exactly.
        """
        taken = ok.clone()
        for g in grads.values():
            taken &= torch.isfinite(g.reshape(g.shape[0], -1).sum(1))
        # On CPU, checking first skips a pass per tensor in the usual all-taken case; on CUDA
        # that check would stall the queue every step, so select always.
        select = self.device.type == "cuda" or not bool(taken.all())
        old_state = self.opt_state
        # In place unless a held-back member must keep its moments (it goes on later); one that
        # freezes at once never uses them again.
        directions, self.opt_state = self.optimizer.update(grads, self.opt_state, inplace=not select or self.freeze_after == 1)
        for name, p in self.params.items():
            direction = torch.where(broadcast(taken, p), directions[name], 0.0) if select else directions[name]
            p.addcmul_(broadcast(lr, p), direction, value=-1)
        W_dec = self.params["W_dec"]
        unit = F.normalize(W_dec, dim=-1)
        W_dec.copy_(torch.where(broadcast(taken, W_dec), unit, W_dec) if select else unit)
        if select and self.freeze_after > 1:  # held-back members go on later from their old moments
            kept = {part: {n: torch.where(broadcast(taken, old), getattr(self.opt_state, part)[n], old)
                           for n, old in getattr(old_state, part).items()} for part in ("mu", "nu")}
            self.opt_state = self.opt_state._replace(**kept)
        return taken

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [M, B, n_padded], x_hat [M, B, d]) of every member on `batch` [B, d]."""
        return self._forward(self.params, self.hparams, batch)

    @torch.no_grad()
    def decoders(self) -> torch.Tensor:
        """Every member's unit-norm dictionary [M, n_padded, d] (padded rows are zero)."""
        return torch.func.vmap(lambda p, h: self.architecture.decoder(p, h, self.layout))(self.params, self.hparams)

    # -- plain-data views ------------------------------------------------------

    def member_state(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(params, optimizer moments) of one member, unpadded, on CPU.

        W_dec is the member's unit-norm dictionary (for tied members, the
        normalised encoder), so every saved SAE decodes the same way.
        """
        member = self.members[index]
        params = {name: p[index].detach().cpu().clone() for name, p in self.params.items()}
        hp = {name: h[index].cpu() for name, h in self.hparams.items()}
        if member.variant == "tied":  # stored W_dec rows are already unit norm; renormalising would perturb a resume
            params["W_dec"] = sae.decoder(params, hp, sae.layout([member]))
        params = architectures.unpad(self.architecture, params, member.dict_size)
        moments = {}
        for prefix, tree in (("mu", self.opt_state.mu), ("nu", self.opt_state.nu)):
            cut = architectures.unpad(self.architecture, {name: value[index].detach().cpu() for name, value in tree.items()}, member.dict_size)
            moments.update({f"{prefix}.{name}": value.clone() for name, value in cut.items()})
        moments["state.tokens_since_fired"] = self.tokens_since_fired[index, : member.dict_size].cpu().clone()
        return params, moments

    def load_member_state(self, index: int, params: dict[str, torch.Tensor], moments: dict[str, torch.Tensor] | None) -> None:
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

    def controller_state(self, index: int) -> dict[str, float]:
        """One member's controller state as plain floats (float32 values: exact through JSON)."""
        return {name: float(self.controller[name][index]) for name in steering.STATE}

    def load_controller_state(self, index: int, state: dict[str, float]) -> None:
        for name in steering.STATE:
            self.controller[name][index] = state[name]

    def set_step(self, step: int, rows_seen: int) -> None:
        """Restore the step counters (the Adam bias correction counts steps too)."""
        self.step_count = int(step)
        self.rows_seen = int(rows_seen)
        self._device_step.fill_(int(step))
        for count in self.opt_state.count.values():
            count.fill_(int(step))


def _encode_decode(architecture, params, hp, x, layout):
    codes = architecture.encode(params, hp, x, layout)
    return codes, architecture.decode(params, hp, codes, layout)


def _fill(slot: torch.Tensor, value: torch.Tensor) -> None:
    """Copy one member's `value` into the start of its padded `slot` (any rank, 0-d included)."""
    slot[tuple(slice(0, size) for size in value.shape)] = value.to(slot.device)


def _stack(trees: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.stack([tree[name] for tree in trees]).to(device) for name in trees[0]}
