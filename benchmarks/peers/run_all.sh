#!/usr/bin/env bash
# Train the peers (SAELens JumpReLU and TopK, sparsify TopK) on an saescope store, each in its own
# environment (bash scripts/peer-envs.sh), at the fidelity benchmark's budget.
#   bash benchmarks/peers/run_all.sh STORE OUT_DIR [SITES...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
store=$1; out=$2; shift 2
sites=("${@:-layer_6.resid_post layer_6.mlp_out layer_6.attn_z}")
peers=${SAESCOPE_PEERS:-/work/peers}
acts="$out/acts"
mkdir -p "$out"
python3 "$here/dump_acts.py" --store "$store" --out "$acts"
common=(--width 2048 --k 50 --batch-size 4096 --tokens 262144 --seed 0)
for site in ${sites[@]}; do
  "$peers/sparsify/bin/python" "$here/train_sparsify.py" --acts "$acts/$site.npy" --arch topk "${common[@]}" \
      --out "$out/sparsify_topk_$site.npz"
  "$peers/saelens/bin/python" "$here/train_saelens.py" --acts "$acts/$site.npy" --arch topk "${common[@]}" \
      --out "$out/saelens_topk_$site.npz"
  # λ = 1e6: the L0 closest to 50 that SAELens's JumpReLU reaches in 64 steps (λ = 1 … 1e6 all give ~1,860)
  "$peers/saelens/bin/python" "$here/train_saelens.py" --acts "$acts/$site.npy" --arch jumprelu --l0-coefficient 1e6 \
      "${common[@]}" --out "$out/saelens_jumprelu_$site.npz"
done
