#!/usr/bin/env bash
# The wheels gpu_suite.sh needs beyond a CUDA image that already has torch 2.11 (and numpy, pandas, pyarrow,
# safetensors, huggingface_hub, ...), for a GPU machine with no package index: this project, DeepSpeed (built here:
# PyPI has only its sdist) and the pinned versions of requirements.txt that such images lack or hold in other
# versions. The list is what the suite's processes imported (models, step times, inference, both stages under
# ZeRO-2/3), less what that image had; 21 MiB in all.
#
#   bash benchmarks/offline_wheels.sh DIR [PYTHON_VERSION]     # here, with an index; PYTHON_VERSION default 3.12
#   python3 -m pip install --no-index --no-deps --upgrade DIR/*.whl && OUT=results bash benchmarks/gpu_suite.sh
set -euo pipefail
DIR=${1:?usage: bash benchmarks/offline_wheels.sh DIR [PYTHON_VERSION]}
PY=${2:-3.12}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$DIR"
pinned() { grep -E "^$1==" "$REPO/requirements.txt"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
    "$(pinned llamafactory)" "$(pinned transformers)" "$(pinned accelerate)" "$(pinned peft)" "$(pinned trl)" \
    "$(pinned datasets)" "$(pinned gguf)" tokenizers==0.22.2 fsspec==2025.3.0 dill==0.3.8 multiprocess==0.70.16 \
    omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 hjson==3.1.0 pydantic==2.12.3 pydantic-core==2.41.4 \
    annotated-types==0.7.0 typing-inspection==0.4.2 pytz==2026.6
python3 -m pip wheel -q --no-deps -w "$DIR" "$(pinned deepspeed)" "$REPO"
ls "$DIR"
