#!/usr/bin/env bash
# Issue 26's GPU check in one device call of about 3 minutes: the cuda-marked fp8 tests (torchao float8 on one
# GPU, FSDP2 with float8 all-gather, DeepSpeed ZeRO-3 with LLaMA-Factory's ds_z3_fp8 config), each against bf16.
# Logs go to $OUT.
#
# Once, on the build machine:
#   bash ../shared/gpu/fetch-wheels.sh pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 torchao==0.18.0
# Then: device run(command="bash benchmarks/gpu_fp8.sh", carry=[".whl"], timeout_s=300).
set -u
OUT=${OUT:-/tmp/lf-dist-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  && export PYTHONPATH=$PWD/.site:$PWD || exit 1
{ nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv
  python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"
} 2>&1 | tee "$OUT/device.txt"
timeout 240 python3 -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_fp8.py 2>&1 | tee "$OUT/fp8_cuda_tests.log"
