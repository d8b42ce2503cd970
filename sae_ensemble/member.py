"""The hyperparameters of one SAE in a sweep: plain data, one member of the inner grid."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sae_ensemble.config import K_VARIANTS, L1_VARIANTS, TRANSCODER_VARIANTS, Variant


@dataclass(frozen=True)
class Member:
    """One SAE to train. Every field is a hyperparameter; `member_id` is derived from them."""

    variant: str
    """SAE variant: relu (untied), tied, topk, batchtopk, matryoshka, jumprelu or gated (architectures/)."""
    d_in: int
    """Width of the activations it reconstructs."""
    dict_size: int
    """Number of dictionary features."""
    l1: float = 1e-3
    """L1 coefficient on feature activations (relu, tied; gated: on its gate path; ignored by the others)."""
    bias_decay: float = 0.0
    """Coefficient of the L2 norm of the encoder bias in the loss."""
    lr: float = 1e-3
    """Peak Adam learning rate."""
    seed: int = 0
    """Seed of the weight initialisation."""
    k: int = 0
    """Active features per row (topk; batchtopk and matryoshka: on average over the batch)."""
    use_b_dec: bool = True
    """Learn a decoder bias (pre-encoder centring); False holds it at zero."""
    lr_warmup_steps: int = 0
    """Steps of linear learning-rate warmup from 0."""
    lr_decay_steps: int = 0
    """Final steps over which the learning rate decays linearly to 0 (0 = no decay)."""
    l1_warmup_steps: int = 0
    """Steps of linear L1-coefficient warmup from 0."""
    target_l0: float = 0.0
    """Target L0 (active features per row); 0 = none. relu and tied members steer their sparsity
    coefficient toward it every step, starting from `l1` (steering.py); topk members have k = round(target_l0)."""
    l0_coefficient: float = 0.0
    """jumprelu: coefficient of the L0 penalty (our MSE is a mean over d_in: SAELens' value / d_in)."""
    threshold: float = 0.01
    """jumprelu: initial threshold of every feature (its log is trained)."""
    bandwidth: float = 0.05
    """jumprelu: width of the rectangle kernel of the straight-through estimators."""
    topk_threshold_lr: float = 0.01
    """batchtopk, matryoshka: rate of the running estimate of the inference threshold (SAELens' name)."""
    matryoshka_widths: tuple[int, ...] = ()
    """matryoshka: the nested prefix sizes below dict_size, increasing (dict_size is always the last level)."""
    auxk_dead_tokens: int = 0
    """topk, batchtopk, matryoshka: AuxK (Gao et al. 2024) on features that fired in none of this many most
    recent training rows; 0 = no AuxK (the hand-written kernels implement none)."""
    auxk_coefficient: float = 1 / 32
    """Coefficient of the AuxK loss (Gao et al.'s 1/32), when auxk_dead_tokens > 0."""
    k_aux: int = 0
    """Dead features AuxK reconstructs the residual with; 0 = d_in // 2 (SAELens), at most dict_size."""
    resample_every: int = 0
    """relu, tied: every this many steps, re-initialise the dead features from high-loss inputs (Anthropic
    2023; dictionary_learning's resample_steps); 0 = never. Dead = fired in none of the rows since the last."""
    max_grad_norm: float = 0.0
    """Clip each step's gradient to this L2 norm over all the member's params (torch's clip_grad_norm_); 0 = never.
    SAELens and dictionary_learning always clip at 1.0 of their loss, which is d_in times ours: 1 / d_in here."""
    encoder_init_norm: float = 1.0
    """Norm of each encoder row at init (the encoder starts as this times the decoder's unit rows)."""
    learned_decoder_norm: bool = False
    """topk, batchtopk and matryoshka SAEs: the decoder rows keep a learned norm (no renormalisation), which scales
    each feature's pre-activation before the selection, and the decoder uses the rows' directions: SAELens' TopK and
    BatchTopK training (an unconstrained W_dec with rescale_acts_by_decoder_norm, its default). The same SAEs as unit
    rows, reached by another optimisation path; the SAE saved at the end has the norms folded into its encoder."""
    d_out: int = 0
    """A transcoder's output width: it encodes an input of width d_in and reconstructs another activation of width
    d_out (its batches are [input | target], the target from column d_in); 0 = an SAE, reconstructing its input."""
    skip_connection: bool = False
    """A skip transcoder: a learned linear path W_skip [d_out, d_in] from input to output beside the features."""
    hook: str | None = None
    """The TransformerLens hook whose activations it reads, in a run over several hooks (data.hooks); None in a
    run over one store, whose hook (if any) is the run's."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "matryoshka_widths", tuple(int(w) for w in self.matryoshka_widths)
        )  # cfg.json gives a list
        if self.variant not in Variant.__members__:
            raise ValueError(f"variant={self.variant!r} is unknown; allowed: {', '.join(Variant)}")
        object.__setattr__(
            self, "variant", str(self.variant)
        )  # plain str in ids, JSON and comparisons, also from a Variant
        if self.d_in < 1 or self.dict_size < 1:
            raise ValueError(f"d_in={self.d_in} and dict_size={self.dict_size} must both be at least 1")
        if self.variant in K_VARIANTS and not 1 <= self.k <= self.dict_size:
            raise ValueError(f"k={self.k} must be between 1 and dict_size={self.dict_size} for a {self.variant} member")
        if self.variant in L1_VARIANTS and self.l1 <= 0:
            raise ValueError(f"l1={self.l1} of a {self.variant} member must be positive (variant topk has no L1 term)")
        if self.variant == "jumprelu" and not (self.l0_coefficient >= 0 and self.threshold > 0 and self.bandwidth > 0):
            raise ValueError(
                f"a jumprelu member needs l0_coefficient >= 0, threshold > 0 and bandwidth > 0; "
                f"got {self.l0_coefficient}, {self.threshold}, {self.bandwidth}"
            )
        if not 0 < self.topk_threshold_lr <= 1:
            raise ValueError(f"topk_threshold_lr={self.topk_threshold_lr} must be in (0, 1]")
        widths = self.matryoshka_widths
        if self.variant == "matryoshka" and not (
            widths and all(a < b for a, b in zip((0, *widths), (*widths, self.dict_size)))
        ):
            raise ValueError(
                f"matryoshka_widths={list(widths)} must be non-empty and increase strictly from above 0 to below "
                f"dict_size={self.dict_size}"
            )
        if self.auxk_dead_tokens and self.variant not in K_VARIANTS:
            raise ValueError(
                f"auxk_dead_tokens={self.auxk_dead_tokens} is for {', '.join(K_VARIANTS)} members only "
                f"(variant={self.variant})"
            )
        if self.auxk_dead_tokens < 0 or self.auxk_coefficient < 0 or self.k_aux < 0:
            raise ValueError(
                f"auxk_dead_tokens={self.auxk_dead_tokens}, auxk_coefficient={self.auxk_coefficient} and "
                f"k_aux={self.k_aux} "
                "must be non-negative"
            )
        if self.resample_every and self.variant not in ("relu", "tied"):
            raise ValueError(
                f"resample_every={self.resample_every} is for relu and tied members only (variant={self.variant})"
            )
        if self.resample_every < 0:
            raise ValueError(f"resample_every={self.resample_every} must be non-negative (0 = never)")
        if self.variant != "matryoshka" and widths:
            raise ValueError(
                f"matryoshka_widths={list(widths)} is for matryoshka members only (variant={self.variant})"
            )
        if self.d_out < 0:
            raise ValueError(f"d_out={self.d_out} must be non-negative (0 = an SAE)")
        if self.d_out and self.variant not in TRANSCODER_VARIANTS:
            raise ValueError(
                f"variant={self.variant} cannot be a transcoder (tied: its encoder is its decoder; gated: not "
                f"implemented); transcoders can be {', '.join(TRANSCODER_VARIANTS)}"
            )
        if self.skip_connection and not self.d_out:
            raise ValueError("skip_connection=True is for transcoders only (d_out > 0)")
        if self.d_out and self.resample_every:
            raise ValueError(f"resample_every={self.resample_every} re-initialises SAE features; transcoders have none")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be non-negative (0 = no clipping)")
        if self.learned_decoder_norm and (self.variant not in K_VARIANTS or self.d_out):
            raise ValueError(
                f"learned_decoder_norm=True is for {', '.join(K_VARIANTS)} SAEs only "
                f"(variant={self.variant}, d_out={self.d_out})"
            )
        if not self.encoder_init_norm > 0:
            raise ValueError(f"encoder_init_norm={self.encoder_init_norm} must be positive")
        if self.bias_decay < 0:
            raise ValueError(f"bias_decay={self.bias_decay} must be non-negative")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.target_l0 < 0:
            raise ValueError(f"target_l0={self.target_l0} must be non-negative (0 = a fixed l1)")
        if self.variant == "topk" and self.target_l0 > 0 and self.k != round(self.target_l0):
            raise ValueError(
                f"k={self.k} of a topk member with target_l0={self.target_l0:g} must be "
                f"round(target_l0)={round(self.target_l0)}"
            )
        if self.variant != "topk" and self.target_l0 > 0 and self.l1 <= 0:
            raise ValueError(f"l1={self.l1} is the starting coefficient of a target-L0 member and must be positive")
        for name in ("lr_warmup_steps", "lr_decay_steps", "l1_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be non-negative")

    @property
    def row_width(self) -> int:
        """Width of the batch rows it trains on: d_in, or a transcoder's [x | y], d_in + d_out."""
        return self.d_in + self.d_out

    @property
    def member_id(self) -> str:
        """Stable, human-readable id, e.g. `relu-d512-l1_0.001-bd0.05-lr0.001-s0` (in a run over several hooks
        `blocks.3.hook_resid_post-relu-d512-...`),
        `jumprelu-d512-l0c0.001-th0.01-bw0.05-...`,
        or `relu-d512-L0_8-bd0-lr0.003-s0` for a member steered to L0 8 (its starting l1 is in cfg.json)."""
        if self.target_l0 > 0:
            sparsity = [f"L0_{self.target_l0:g}"]
        elif self.variant in K_VARIANTS:
            sparsity = [f"k{self.k}"]
            if self.variant == "matryoshka":
                sparsity.append("w" + "_".join(map(str, self.matryoshka_widths)))
            if self.variant != "topk" and self.topk_threshold_lr != 0.01:
                sparsity.append(f"tlr{self.topk_threshold_lr:g}")
        elif self.variant == "jumprelu":
            sparsity = [f"l0c{self.l0_coefficient:g}", f"th{self.threshold:g}", f"bw{self.bandwidth:g}"]
        else:
            sparsity = [f"l1_{self.l1:g}"]
        if self.auxk_dead_tokens:  # the remedies, only when on: ids of members without them do not change
            sparsity.append(
                f"auxk{self.auxk_dead_tokens}"
                + (f"c{self.auxk_coefficient:g}" if self.auxk_coefficient != 1 / 32 else "")
                + (f"k{self.k_aux}" if self.k_aux else "")
            )
        if self.resample_every:
            sparsity.append(f"rs{self.resample_every}")
        if self.max_grad_norm:
            sparsity.append(f"gc{self.max_grad_norm:g}")
        if self.encoder_init_norm != 1.0:  # only when set: ids of members at the default do not change
            sparsity.append(f"ein{self.encoder_init_norm:g}")
        if self.learned_decoder_norm:
            sparsity.append("ldn")
        transcoder = [f"{'skip' if self.skip_connection else ''}tc{self.d_out}"] if self.d_out else []
        parts = [
            self.variant,
            f"d{self.dict_size}",
            *transcoder,
            *sparsity,
            f"bd{self.bias_decay:g}",
            f"lr{self.lr:g}",
            f"s{self.seed}",
        ]
        if not self.use_b_dec:
            parts.append("nobdec")
        if self.hook is not None:  # first, so a run's members sort by hook; absent for one store: ids unchanged
            parts.insert(0, self.hook)
        return "-".join(parts)

    def to_dict(self) -> dict:
        """Plain JSON values (matryoshka_widths as a list, as cfg.json and wandb hold it); no `hook` in a run over
        one store, whose hook is the run's (its wandb config and Hydra config say which)."""
        values = {**dataclasses.asdict(self), "matryoshka_widths": list(self.matryoshka_widths)}
        if self.hook is None:
            del values["hook"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> Member:
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown member fields {unknown}; allowed: {sorted(names)}")
        return cls(**values)
