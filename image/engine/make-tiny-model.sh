#!/usr/bin/env bash
# Writes the tiny dummy-weight Llama model the engine tests serve, into OUTDIR, using the
# vLLM CPU image's own `tokenizers` (nothing on the host, nothing downloaded).
# Usage: image/engine/make-tiny-model.sh OUTDIR [IMAGE]
set -euo pipefail
out=$(realpath -m "${1:?usage: make-tiny-model.sh OUTDIR [IMAGE]}")
image=${2:-garage-node/vllm-cpu:test}
mkdir -p "$out"
exec docker run --rm --pull never --network none --entrypoint python3 -v "$out:/model" "$image" /opt/garage/make_tiny_model.py /model
