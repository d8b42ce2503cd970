"""Export trained members to the formats of SAELens, dictionary_learning and EleutherAI sparsify.

    python -m sae_ensemble.export RUN_DIR --format {saelens,dictionary_learning,sparsify}
                                  [--members GLOB] [--out DIR] [--store STORE_DIR]

writes `OUT/<member_id>/` for every finished member whose id matches GLOB (default: all;
OUT defaults to `RUN_DIR/export/<format>`). docs/interop.md describes each layout.

Normalisation is folded into the weights, so every export reads and writes raw activations:
a member trained on normalised rows z = (x - shift) / scale (`training.normalize`) has codes
c = f(W_enc (z - b_dec) + b_enc) and x_hat = scale (c W_dec + b_dec) + shift. Exported:

    W_enc' = W_enc   b_enc' = scale b_enc   W_dec' = W_dec   b_dec' = shift + scale b_dec

so the decoder keeps unit-norm rows (every library assumes them) and the exported codes are
`scale` times ours, i.e. in the raw activations' units; reconstructions are identical. Top-k
picks the same features because scale > 0. Exported configs declare no normalisation.
The shift and scale come from the store (`--store`), needed only for normalised members.

The other architectures' params fold the same way: every encoder-side bias (b_gate, b_mag) is
multiplied by `scale`, and so is every threshold (codes scale with it).

Variants: relu and tied export everywhere (a tied member's saved W_dec is its normalised
encoder, so it exports as an untied SAE with equal weights); topk exports everywhere;
sparsify holds TopK SAEs only, so the others are refused there (exit 2). SAELens takes every
variant: jumprelu as jumprelu (threshold = exp(log_threshold)), batchtopk and matryoshka as
jumprelu with their running threshold for every feature (as SAELens saves its own BatchTopK
SAEs; ReLU then the threshold is the jump ReLU for a threshold >= 0), gated as gated.
dictionary_learning's exports of those are not written yet: refused with one line.

Transcoders (Member.d_out > 0: c = f(W_enc x + b_enc), y_hat = c W_dec + b_dec [+ x W_skip^T]), which
train unnormalised only (a normalised one is refused):

    variant              SAELens 6.54 (apply_b_dec_to_input false)         sparsify (transcode true)
    relu                 transcoder / skip_transcoder                       refused (TopK only)
    jumprelu, batchtopk  jumprelu_transcoder / jumprelu_skip_transcoder     refused (TopK only)
      and matryoshka     (threshold as for their SAEs)
    topk                 refused (SAELens has no TopK transcoder)           if d_out == d_in (its one width)

dictionary_learning has no transcoder class: refused. SAELens' metadata.hook_name_out is the run's
data.hooks_out entry for the member's input hook (else `unknown`).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sae_ensemble.atomic import atomic_write, write_json_atomic
from sae_ensemble.checkpoint import load_member
from sae_ensemble.member import Member
from sae_ensemble.rundir import CheckpointError, MemberDir, RunDir, read_json

FORMATS = ("saelens", "dictionary_learning", "sparsify")
EXPRESSIBLE = {
    "saelens": ("relu", "tied", "topk", "batchtopk", "matryoshka", "jumprelu", "gated"),
    "dictionary_learning": ("relu", "tied", "topk"),
    "sparsify": ("topk",),
}
SAELENS_ARCHITECTURE = {
    "relu": "standard",
    "tied": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
}
# SAELens 6.54's transcoder classes by the SAE architecture a variant exports as; it has no TopK or gated one
SAELENS_TRANSCODER = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}
SAELENS_VERSION = "6.54.12"  # the sae-lens release tests/test_interop.py loads these files with


class ExportError(ValueError):
    """A member cannot be exported as asked (unknown format, inexpressible variant, missing store)."""


def folded_params(
    member: Member, params: dict[str, torch.Tensor], shift: torch.Tensor, scale: float
) -> dict[str, torch.Tensor]:
    """Our params rewritten for raw activations (module docstring); W_* [n, d] rows, b_enc [n], b_dec [d];
    gated: b_gate, r_mag, b_mag [n] instead of b_enc; jumprelu, batchtopk, matryoshka: threshold [n] added.
    Transcoders (never normalised): W_dec [n, d_out], b_dec [d_out], and W_skip [d_out, d_in] if they skip."""
    b_dec = params["b_dec"].float() * float(member.use_b_dec)  # the architectures ignore b_dec when use_b_dec is off
    folded = {
        "W_enc": params["W_enc"].float(),
        "W_dec": F.normalize(params["W_dec"].float(), dim=-1),  # the dictionary every decoder() uses
        "b_dec": b_dec if member.d_out else shift.float() + scale * b_dec,
    }
    if "W_skip" in params:
        folded["W_skip"] = params["W_skip"].float()
    for name in ("b_enc", "b_gate", "b_mag"):
        if name in params:
            folded[name] = params[name].float() * scale
    if "r_mag" in params:
        folded["r_mag"] = params["r_mag"].float()  # a ratio of weights: no unit to fold
    if "log_threshold" in params:
        folded["threshold"] = params["log_threshold"].float().exp() * scale
    if "threshold" in params:  # BatchTopK's one running threshold, for every feature
        folded["threshold"] = params["threshold"].float() * scale * torch.ones(member.dict_size)
    return folded


def run_context(run_dir: Path) -> dict[str, Any]:
    """Model name, hooks (in; transcoders: out), context length and BOS use of a sweep, from Hydra's saved config.

    Synthetic runs and run directories without `.hydra/config.yaml` get placeholders, since a
    SAELens config needs these fields but only an LM sweep has real values for them.
    """
    context = {
        "model_name": "unknown",
        "hook_name": "unknown",
        "context_size": None,
        "prepend_bos": True,
        "source": "unknown",
        "hooks_out": {},
        "hook_name_out": "unknown",
    }
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        return context
    from omegaconf import OmegaConf  # Hydra's config library: resolves ${layer} in the hook name
    from omegaconf.errors import OmegaConfBaseException

    from sae_ensemble.config import register

    register()  # our resolvers (repo_path, logspace), which saved values may use
    cfg = OmegaConf.load(saved)

    def select(key: str, default: Any) -> Any:
        try:
            return OmegaConf.select(cfg, key, default=default)
        except (
            OmegaConfBaseException
        ):  # an interpolation this process cannot resolve: say unknown, never fail the export
            return default

    # data=lm's config has a dataset, data=synthetic's features (runs before the data split also said data.source)
    context["source"] = select("data.source", None) or (
        "lm"
        if select("data.dataset", None) is not None
        else "synthetic"
        if select("data.n_features", None) is not None
        else "unknown"
    )
    if context["source"] == "lm":
        context["model_name"] = str(select("model.name", "unknown"))
        listed = select("data.hooks", None) or []  # several hooks: each member names its own (member.hook)
        context["hook_name"] = str(listed[0] if len(listed) == 1 else select("hook", "unknown"))
        outs = select("data.hooks_out", None) or []  # transcoders' output hooks, aligned with data.hooks
        context["hooks_out"] = {str(h): str(o) for h, o in zip(listed, outs)} if len(outs) == len(listed) else {}
        context["hook_name_out"] = str(outs[0]) if len(outs) == 1 else "unknown"
        context["context_size"] = select("data.context_length", None)
    return context


def normalization_of(cfg: dict[str, Any], store_dir: str | Path | None) -> tuple[torch.Tensor, float]:
    """(shift [d], scale) a member was trained with: zeros and 1 unless cfg.json's `normalize` says otherwise."""
    mode = cfg.get("normalize", "none")
    d_in = int(cfg["d_in"])
    if mode == "none":
        return torch.zeros(d_in), 1.0
    if store_dir is None:
        raise ExportError(
            f"member {cfg['member_id']} was trained with normalize={mode!r}; pass --store with the store it was "
            "trained on so the export can fold the normalisation into its weights"
        )
    from sae_ensemble.activations.format import StoreError
    from sae_ensemble.activations.reader import ActivationStore

    try:
        store = ActivationStore.open(store_dir)
    except StoreError as error:
        raise ExportError(f"--store {store_dir} cannot be opened ({error})") from None
    if cfg.get("store_fingerprint") not in (None, store.fingerprint):
        raise ExportError(
            f"--store {store_dir} has fingerprint {store.fingerprint}, but member {cfg['member_id']} was trained on "
            f"{cfg['store_fingerprint']}; pass the store it was trained on"
        )
    shift, scale = store.normalization(mode)
    return shift, float(scale)


# -- one writer per format: (directory, member, folded params, run context) -----------------------


def write_saelens(out: Path, member: Member, params: dict[str, torch.Tensor], context: dict[str, Any]) -> None:
    """SAELens >= 6: cfg.json + sae_weights.safetensors, read by `SAE.load_from_disk`."""
    # W_enc [d_in, d_sae]: SAELens multiplies x @ W_enc; W_dec [d_sae, d_in]; every other tensor by its own name
    # transcoders: W_dec [d_sae, d_out], b_dec [d_out], W_skip [d_out, d_in] as ours
    weights = {name: (value.T if name == "W_enc" else value).contiguous() for name, value in params.items()}
    atomic_write(out / "sae_weights.safetensors", lambda tmp: save_file(weights, tmp))
    architecture = SAELENS_ARCHITECTURE[member.variant]
    if member.d_out:  # transcoder -> skip_transcoder, jumprelu_transcoder -> jumprelu_skip_transcoder
        architecture = SAELENS_TRANSCODER[architecture].replace(
            "transcoder", "skip_" * member.skip_connection + "transcoder"
        )
    cfg = {
        "architecture": architecture,
        "d_in": member.d_in,
        "d_sae": member.dict_size,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not member.d_out,  # our SAEs subtract b_dec before encoding, transcoders do not
        "normalize_activations": "none",  # folded into the weights (module docstring)
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": context["model_name"],
            "hook_name": member.hook or context["hook_name"],
            "hook_head_index": None,
            "context_size": context["context_size"],
            "prepend_bos": context["prepend_bos"],
            "dataset_path": None,
            "model_class_name": "HookedTransformer",
            "exported_from": f"sae_ensemble member {member.member_id}",
        },
    }
    if member.d_out:
        cfg["d_out"] = member.d_out
        hook_out = context["hooks_out"].get(member.hook) if member.hook else context["hook_name_out"]
        cfg["metadata"].update(hook_name_out=hook_out or "unknown", hook_head_index_out=None)
    if member.variant == "topk":
        cfg["k"] = member.k
        cfg["rescale_acts_by_decoder_norm"] = False  # our decoder rows are unit norm already
    write_json_atomic(out / "cfg.json", cfg)


def write_dictionary_learning(
    out: Path, member: Member, params: dict[str, torch.Tensor], context: dict[str, Any]
) -> None:
    """dictionary_learning: ae.pt (a plain state dict of tensors) + config.json, read by `utils.load_dictionary`."""
    decoder = params["W_dec"].T.contiguous()  # nn.Linear(dict_size, activation_dim).weight is [d, n]
    if member.variant == "topk":
        state = {
            "k": torch.tensor(member.k, dtype=torch.int32),
            "threshold": torch.tensor(-1.0),  # -1: threshold unused
            "decoder.weight": decoder,
            "encoder.weight": params["W_enc"].contiguous(),
            "encoder.bias": params["b_enc"].contiguous(),
            "b_dec": params["b_dec"].contiguous(),
        }
        dict_class, trainer_class = "AutoEncoderTopK", "TopKTrainer"
    else:
        state = {
            "bias": params["b_dec"].contiguous(),
            "encoder.weight": params["W_enc"].contiguous(),
            "encoder.bias": params["b_enc"].contiguous(),
            "decoder.weight": decoder,
        }
        dict_class, trainer_class = "AutoEncoder", "StandardTrainer"
    atomic_write(out / "ae.pt", lambda tmp: torch.save(state, tmp))
    trainer = {
        "dict_class": dict_class,
        "trainer_class": trainer_class,
        "activation_dim": member.d_in,
        "dict_size": member.dict_size,
        "lr": member.lr,
        "seed": member.seed,
        "lm_name": context["model_name"],
        "submodule_name": member.hook or context["hook_name"],
        "exported_from": f"sae_ensemble member {member.member_id}",
    }
    if member.variant == "topk":
        trainer["k"] = member.k
    else:
        trainer["l1_penalty"] = member.l1
    write_json_atomic(out / "config.json", {"trainer": trainer, "buffer": {"ctx_len": context["context_size"]}})


def write_sparsify(out: Path, member: Member, params: dict[str, torch.Tensor], context: dict[str, Any]) -> None:
    """sparsify: cfg.json (SparseCoderConfig fields + d_in) + sae.safetensors, read by `Sae.load_from_disk`."""
    weights = {
        "encoder.weight": params["W_enc"].contiguous(),
        "encoder.bias": params["b_enc"].contiguous(),
        "W_dec": params["W_dec"].contiguous(),
        "b_dec": params["b_dec"].contiguous(),
    }
    if "W_skip" in params:
        weights["W_skip"] = params["W_skip"].contiguous()  # [d, d]: sparsify's one width, d_out == d_in
    atomic_write(out / "sae.safetensors", lambda tmp: save_file(weights, tmp))
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, member.dict_size // member.d_in),
        "normalize_decoder": True,
        "num_latents": member.dict_size,
        "k": member.k,
        "multi_topk": False,
        "skip_connection": member.skip_connection,
        "transcode": bool(member.d_out),
        "d_in": member.d_in,
    }
    write_json_atomic(out / "cfg.json", cfg)


WRITERS: dict[str, Callable[[Path, Member, dict[str, torch.Tensor], dict[str, Any]], None]] = {
    "saelens": write_saelens,
    "dictionary_learning": write_dictionary_learning,
    "sparsify": write_sparsify,
}


def refuse_transcoder(fmt: str, cfg: dict[str, Any]) -> None:
    """ExportError if `fmt` cannot hold this transcoder member (module docstring's table)."""
    name = f"transcoder {cfg['member_id']}"
    if cfg.get("normalize", "none") != "none":
        raise ExportError(f"{name} was trained with normalize={cfg['normalize']!r}; transcoders export from none only")
    if fmt == "dictionary_learning":
        raise ExportError(f"dictionary_learning has no transcoder class ({name}); export it to saelens or sparsify")
    if fmt == "saelens" and SAELENS_ARCHITECTURE[cfg["variant"]] not in SAELENS_TRANSCODER:
        raise ExportError(
            f"SAELens has no {cfg['variant']} transcoder ({name}); its transcoders take variants relu, jumprelu, "
            "batchtopk, matryoshka; export topk transcoders to sparsify"
        )
    if fmt == "sparsify" and cfg["d_out"] != cfg["d_in"]:
        raise ExportError(
            f"sparsify's transcoders have one width, but {name} has d_in={cfg['d_in']}, d_out={cfg['d_out']}; "
            "export it to saelens (relu) or train d_out == d_in"
        )


def export_run(
    run_dir: str | Path,
    fmt: str,
    members: str = "*",
    out: str | Path | None = None,
    store_dir: str | Path | None = None,
) -> list[Path]:
    """Export every finished member of `run_dir` whose id matches `members`; returns the directories written.

    Checks every selected member before writing any, so a refusal leaves nothing half-exported.
    """
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    dirs = [d.path for d in RunDir(run_dir).finished_members() if fnmatch.fnmatchcase(d.path.name, members)]
    if not dirs:
        raise ExportError(f"no finished member in {RunDir(run_dir).members} matches --members {members!r}")
    cfgs = [read_json(MemberDir(d).cfg) for d in dirs]
    refused = [c["member_id"] for c in cfgs if c.get("variant") not in EXPRESSIBLE[fmt]]
    if refused:
        raise ExportError(
            f"{fmt} cannot express variant(s) {sorted({c['variant'] for c in cfgs if c['member_id'] in refused})} "
            f"of {len(refused)} member(s) (e.g. {refused[0]}); it holds {', '.join(EXPRESSIBLE[fmt])}: select those "
            "with --members"
        )
    for cfg in cfgs:
        if cfg.get("d_out"):
            refuse_transcoder(fmt, cfg)
    normalizations = [normalization_of(c, store_dir) for c in cfgs]
    context = run_context(run_dir)
    out = run_dir / "export" / fmt if out is None else Path(out)
    written = []
    for directory, (shift, scale) in zip(dirs, normalizations):
        member, params, _, _ = load_member(directory)
        target = out / member.member_id
        target.mkdir(parents=True, exist_ok=True)
        WRITERS[fmt](target, member, folded_params(member, params, shift, scale), context)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_ensemble.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a sweep's run directory (holds members/<id>/)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="target library's format")
    parser.add_argument("--members", default="*", help="glob over member ids (default: all)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export/FORMAT)")
    parser.add_argument(
        "--store", default=None, help="store the members were trained on (needed when training.normalize != none)"
    )
    args = parser.parse_args(argv)
    try:
        written = export_run(args.run_dir, args.format, args.members, args.out, args.store)
    except (ExportError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
