#!/usr/bin/env bash
# Run each peer runner on generated specs and print one summary line per (peer, case).
#
#   tests/interop/peers/try_runners.sh [tiny|small] [LIB ...]     (default: tiny, all three libraries)
#
# tiny:  d_in 32, dict 64/128, batch 64, 20 steps: relu, topk (AuxK), batchtopk and jumprelu cases;
#        checks that every trained member's loss fell and its encoder weights moved.
# small: d_in 256, batch 1024, 200 steps, 2 threads: 16 relu members (dict 512 and 1024 x 8 l1) and
#        8 topk members (dict 1024, k 32, AuxK; 4 lr x 2 seeds), for timing; saelens also in MultiSAETrainer mode.
# Needs `make interop`. Writes under ${PEERS_TRY_DIR:-/tmp/peers_try}/<preset>.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PRESET=${1:-tiny}; shift || true
LIBS=${*:-saelens dictionary_learning sparsify}
DIR=${PEERS_TRY_DIR:-/tmp/peers_try}/$PRESET
mkdir -p "$DIR"
GEN=.interop/saelens/bin/python  # any interop venv has torch + safetensors

# Data: sparse combinations of unit-norm ground-truth features (like sweep.py's synthetic store), so the
# SAEs have something to find; specs for each case of the preset.
"$GEN" - "$PRESET" "$DIR" <<'EOF'
import json, sys, torch
from safetensors.torch import save_file
preset, out = sys.argv[1], sys.argv[2]
d, steps, batch, threads = {"tiny": (32, 20, 64, 2), "small": (256, 200, 1024, 2)}[preset]
g = torch.Generator().manual_seed(0)
features = torch.nn.functional.normalize(torch.randn(2 * d, d, generator=g), dim=-1)
def rows(n):
    p = (0.99 ** torch.arange(2 * d)) * 5 / (0.99 ** torch.arange(2 * d)).sum()
    active = torch.rand(n, 2 * d, generator=g) < p
    return (active * torch.rand(n, 2 * d, generator=g)) @ features
save_file({"activations": rows(steps * batch).contiguous()}, f"{out}/train.safetensors")
save_file({"activations": rows(2048).contiguous()}, f"{out}/heldout.safetensors")
def member(i, **kw):
    return {"member_id": f"m{i}", "seed": i, "lr": 1e-2 if preset == "tiny" else 1e-3, **kw}  # tiny: 20 steps must show the loss fall
if preset == "tiny":
    cases = {
        "relu": [member(i, dict_size=n, l1=l1) for i, (n, l1) in enumerate([(64, 1e-3), (64, 3e-3), (128, 1e-3), (128, 3e-3)])],
        "topk": [member(i, dict_size=n, k=4, auxk=True, auxk_dead_tokens=256) for i, n in enumerate([64, 128])],
        "batchtopk": [member(i, dict_size=n, k=4, auxk=True, auxk_dead_tokens=256) for i, n in enumerate([64, 128])],
        "jumprelu": [member(i, dict_size=n, threshold=0.01, l0_coefficient=1e-3) for i, n in enumerate([64, 128])],
    }
else:
    l1s = [10 ** (-4 + 2.5 * j / 7) for j in range(8)]
    cases = {
        "relu": [member(i, dict_size=n, l1=l1) for i, (n, l1) in enumerate((n, l1) for n in (512, 1024) for l1 in l1s)],
        "topk": [dict(member(i, dict_size=1024, k=32, auxk=True, auxk_dead_tokens=2000), lr=lr, seed=i % 2)
                 for i, lr in enumerate(lr for lr in (3e-4, 1e-3, 2e-3, 4e-3) for _ in range(2))],
    }
for arch, members in cases.items():
    spec = {"case": f"{preset}-{arch}", "architecture": arch, "d_in": d, "members": members, "batch_size": batch,
            "steps": steps, "threads": threads, "train_rows": f"{out}/train.safetensors",
            "heldout_rows": f"{out}/heldout.safetensors", "device": "cpu"}
    json.dump(spec, open(f"{out}/{arch}.json", "w"), indent=1)
    if preset == "small" and arch == "relu":
        json.dump({**spec, "case": f"{preset}-relu-multi", "saelens_mode": "multi"}, open(f"{out}/relu-multi.json", "w"), indent=1)
EOF

status=0
for lib in $LIBS; do
  for spec in "$DIR"/*.json; do
    name=$(basename "$spec" .json)
    case "$name" in out-*) continue;; *-multi) [ "$lib" = saelens ] || continue;; esac
    echo "== $lib $name" >&2
    if ! .interop/$lib/bin/python tests/interop/peers/${lib}_runner.py "$spec" "$DIR/out-$lib-$name.json" \
         >"$DIR/log-$lib-$name.txt" 2>&1; then
      echo "FAILED: $lib $name (log: $DIR/log-$lib-$name.txt)"; tail -5 "$DIR/log-$lib-$name.txt"; status=1; continue
    fi
    # One line per run; on tiny, a trained member whose loss did not fall or weights did not move fails.
    "$GEN" - "$DIR/out-$lib-$name.json" "$PRESET" <<'EOF' || status=1
import json, sys
r = json.load(open(sys.argv[1]))
if not r["supported"]:
    print(f'{r["peer"]:20} {r["case"]:16} unsupported: {r["reason"]}'); sys.exit(0)
ms = r["members"].values()
mean = lambda key: sum(m[key] for m in ms) / len(ms)
bad = [k for k, m in r["members"].items() if not (m["loss_last"] < m["loss_first"] and m["weights_changed"])]
print(f'{r["peer"]:20} {r["case"]:16} threads {r["threads"]} train {r["train_seconds"]:7.2f}s (cpu {r["train_cpu_seconds"]:7.2f}s)  '
      f'fvu {mean("fvu"):.4f}  l0 {mean("l0"):6.1f}  loss {mean("loss_first"):.4g} -> {mean("loss_last"):.4g}'
      + (f'  NOT TRAINED: {bad}' if bad else ''))
sys.exit(1 if bad and sys.argv[2] == "tiny" else 0)
EOF
  done
done
exit $status
