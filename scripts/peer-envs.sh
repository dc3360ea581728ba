#!/usr/bin/env bash
# Create the peer libraries' virtual environments for benchmarks/peers/:
#   $SAESCOPE_PEERS/saelens   sae-lens     (SAELens)
#   $SAESCOPE_PEERS/sparsify  eai-sparsify (EleutherAI sparsify)
#   $SAESCOPE_PEERS/circuit-tracer  circuit-tracer, with what its transcoder loaders import (not nnsight or
#                                   TransformerLens); tests/test_circuit_tracer_export.py
# SAESCOPE_PEERS defaults to /work/peers.  torch is pinned to 2.13.0 (the CPU build lies on our
# machines' disk) with a constraint file, so pip never resolves it to a multi-GB CUDA build.
# Idempotent: an environment that was built here and still has its package at the pinned
# versions is left alone.  Quiet on success; on failure it prints the tail of the pip log
# ($SAESCOPE_PEERS/<name>.install.log) and exits non-zero.  A fresh build takes ~5 min.
# Arguments: the environments to build (default: saelens sparsify).
# Overrides: PYTHON (base interpreter), SAELENS_VERSION, SPARSIFY_VERSION, CIRCUIT_TRACER_VERSION,
# TORCH_VERSION.
set -euo pipefail

PY=${PYTHON:-python3}
ROOT=${SAESCOPE_PEERS:-/work/peers}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SAELENS_VERSION=${SAELENS_VERSION:-6.54.12}
SPARSIFY_VERSION=${SPARSIFY_VERSION:-1.3.3}
CIRCUIT_TRACER_VERSION=${CIRCUIT_TRACER_VERSION:-0.5.0}

mkdir -p "$ROOT"
CONSTRAINTS="$ROOT/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

# check ENV DIST MODULE VERSION [import]: are DIST==VERSION and torch==TORCH_VERSION installed
# in ENV and MODULE findable?  With a 5th argument MODULE is imported too (slow: sae_lens ~9 s).
check() {
  local env=$1 dist=$2 mod=$3 ver=$4 imp=${5:-}
  [ -x "$env/bin/python" ] || return 1
  "$env/bin/python" -c '
import importlib, importlib.metadata as md, importlib.util, sys
dist, mod, ver, tver, imp = sys.argv[1:]
assert md.version(dist) == ver, (dist, md.version(dist))
assert md.version("torch").split("+")[0] == tver, md.version("torch")
assert importlib.util.find_spec(mod) is not None, mod
if imp:
    importlib.import_module(mod)
' "$dist" "$mod" "$ver" "$TORCH_VERSION" "$imp" >/dev/null 2>&1
}

# build NAME DIST MODULE VERSION [REQUIREMENT ...]
# With requirements, DIST is installed without its own dependencies and the requirements instead
# (circuit-tracer: its loaders need only these; its full set, nnsight and TransformerLens, takes
# ~20 min of dependency resolution for code the tests never run).
build() {
  local name=$1 dist=$2 mod=$3 ver=$4
  shift 4
  local reqs=("$@")
  local env="$ROOT/$name" log="$ROOT/$name.install.log" stamp="$ROOT/$name/.peer-envs-ok"
  local spec="$dist==$ver torch==$TORCH_VERSION${reqs[*]:+ ${reqs[*]}}"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$spec" ] && check "$env" "$dist" "$mod" "$ver"; then
    return 0
  fi
  rm -f "$stamp"
  : > "$log"
  if ! {
    { [ -x "$env/bin/python" ] || "$PY" -m venv "$env"; } &&
    "$env/bin/python" -m pip install -q "torch==$TORCH_VERSION" &&
    if [ ${#reqs[@]} -eq 0 ]; then
      "$env/bin/python" -m pip install -q -c "$CONSTRAINTS" "$dist==$ver"
    else
      "$env/bin/python" -m pip install -q -c "$CONSTRAINTS" --no-deps "$dist==$ver" &&
      "$env/bin/python" -m pip install -q -c "$CONSTRAINTS" "${reqs[@]}"
    fi
  } >>"$log" 2>&1; then
    echo "peer-envs: installing $dist==$ver into $env failed; last lines of $log:" >&2
    tail -n 25 "$log" >&2
    return 1
  fi
  if ! check "$env" "$dist" "$mod" "$ver" import; then
    echo "peer-envs: $env was installed but 'import $mod' or a version check fails:" >&2
    "$env/bin/python" -c "import $mod" 2>&1 | tail -n 15 >&2 || true
    return 1
  fi
  echo "$spec" > "$stamp"
}

# arguments: which environments (default both), e.g. `bash scripts/peer-envs.sh saelens`
status=0
for name in "${@:-saelens sparsify}"; do
  for one in $name; do
    case $one in
      saelens) build saelens sae-lens sae_lens "$SAELENS_VERSION" || status=1 ;;
      sparsify) build sparsify eai-sparsify sparsify "$SPARSIFY_VERSION" || status=1 ;;
      circuit-tracer) build circuit-tracer circuit-tracer circuit_tracer "$CIRCUIT_TRACER_VERSION" \
                        "transformers==4.57.3" "huggingface-hub<1.0" safetensors pyyaml pydantic numpy tqdm einops \
                        || status=1 ;;
      *) echo "peer-envs: unknown environment '$one' (saelens, sparsify, circuit-tracer)" >&2; status=2 ;;
    esac
  done
done
exit $status
