#!/usr/bin/env bash
# Issue 25's GPU checks in one device call of under 6 minutes (a lent card's 15 leave room to start it and rerun
# once): the cuda-marked megatron tests (bf16 forward vs HF, 20 sft steps full and LoRA vs FSDP2, the distributed
# optimizer, the TE spec where TE is importable; TE is not built), then gpu_throughput.py's megatron variant next to
# lf-dist's own step on the same card. Logs and JSON lines go to $OUT.
#
# Once, on the build machine:
#   bash ../shared/gpu/fetch-wheels.sh pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 psutil==7.2.2
# Then: device run(command="bash benchmarks/gpu_megatron.sh", carry=[".whl"], timeout_s=400).
set -u
OUT=${OUT:-/tmp/lf-dist-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false CUDA_DEVICE_MAX_CONNECTIONS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  && export PYTHONPATH=$PWD/.site:$PWD || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
} 2>&1 | tee "$OUT/device.txt"
timeout 200 python3 -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_megatron_cuda.py 2>&1 \
  | tee "$OUT/megatron_cuda_tests.log"
timeout 150 python3 benchmarks/gpu_throughput.py --models "${MODELS:-1b,1b-lora}" --variants lf-dist,megatron \
  --steps "${STEPS:-5}" --warmup 2 > "$OUT/gpu_throughput_megatron.jsonl" 2> "$OUT/gpu_throughput_megatron.err"
cat "$OUT/gpu_throughput_megatron.jsonl"
tail -5 "$OUT/gpu_throughput_megatron.err"
