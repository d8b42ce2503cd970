"""Load our exports with a library's own loader and compare its encode/decode/forward with ours.

    .interop/<lib>/bin/python tests/interop/check.py LIB EXPORT_DIR IO_DIR

Runs inside that library's venv (make interop), so it imports nothing of sae_ensemble.
For every member directory in EXPORT_DIR, IO_DIR/<member_id>.safetensors holds raw inputs `x`
[B, d_in] and our outputs on them: `codes` [B, n] and `recon` [B, d_out]; a transcoder's also hold
`decoded`, our decode of `codes` without the skip path. Prints one JSON object:
{member_id: {"codes": max |diff|, "recon": max |diff| of the library's output on x (decode(encode(x));
a transcoder's forward(x), skip path included), "decode": max |diff| of decode(our codes)},
"_classes": {member_id: the loaded class}, "_versions": {...}}.
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file


def saelens(directory: Path):
    from sae_lens import SAE

    model = SAE.load_from_disk(str(directory), device="cpu")  # cfg.json's architecture picks the class
    return model, model.encode, model.decode, model.forward


def dictionary_learning(directory: Path):
    from dictionary_learning.utils import load_dictionary  # reads config.json's dict_class, then torch.load(ae.pt)

    model, _ = load_dictionary(str(directory), device="cpu")
    return model, model.encode, model.decode, model.forward


def sparsify(directory: Path):
    from sparsify import Sae

    model = Sae.load_from_disk(directory, device="cpu")

    def encode(x):
        top_acts, top_indices, _ = model.encode(x)
        return torch.zeros(x.shape[0], model.num_latents, dtype=top_acts.dtype).scatter(-1, top_indices, top_acts)

    def decode(codes):
        # sparsify decodes (values, indices) of the k active latents: take them from the dense codes
        top_acts, top_indices = codes.topk(model.cfg.k, dim=-1)
        return model.decode(top_acts, top_indices)

    return model, encode, decode, lambda x: model(x).sae_out  # forward adds x @ W_skip.mT when it has one


LIBRARIES = {
    "saelens": (saelens, "sae-lens"),
    "dictionary_learning": (dictionary_learning, "dictionary-learning"),
    "sparsify": (sparsify, "eai-sparsify"),
}


def main(lib: str, export_dir: str, io_dir: str) -> None:
    load, package = LIBRARIES[lib]
    report = {"_versions": {package: version(package), "torch": torch.__version__}, "_classes": {}}
    for directory in sorted(p for p in Path(export_dir).iterdir() if p.is_dir()):
        io = load_file(Path(io_dir) / f"{directory.name}.safetensors")
        model, encode, decode, forward = load(directory)
        report["_classes"][directory.name] = type(model).__name__
        transcoder = "decoded" in io
        with torch.no_grad():
            codes = encode(io["x"])
            recon = forward(io["x"]) if transcoder else decode(codes)
            report[directory.name] = {
                "codes": float((codes - io["codes"]).abs().max()),
                "recon": float((recon - io["recon"]).abs().max()),
                "decode": float((decode(io["codes"]) - io["decoded" if transcoder else "recon"]).abs().max()),
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
