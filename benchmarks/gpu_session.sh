#!/usr/bin/env bash
# Every check still waiting for a GPU (issues 10, 12 and 27), in one device call: the cuda-marked tests,
# gpu_throughput.py, then the time model against it. Logs and JSON lines go to $OUT (the device tool brings them back).
#
# Once, on the build machine (the device image lacks these; versions as the CPU venv installs them):
#   bash ../shared/gpu/fetch-wheels.sh pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
# Then one call: device run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590).
# MODELS / STEPS narrow the benchmark when device time is short (default: all four models, 6 steps).
set -u
OUT=${OUT:-/tmp/lf-dist-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl \
  && export PYTHONPATH=$PWD/.site:$PWD || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$OUT/device.txt"
# Only the files that hold cuda tests: the others import the CPU-only extras (ray, deepspeed, fastapi, ...).
timeout 240 python3 -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_kernels.py tests/test_packing.py \
  tests/test_preference.py tests/test_qlora.py tests/test_seams.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout 300 python3 benchmarks/gpu_throughput.py --models "${MODELS:-1b,3b,1b-lora,8b-lora}" \
  --steps "${STEPS:-6}" --warmup 2 > "$OUT/gpu_throughput.jsonl" 2> "$OUT/gpu_throughput.err"
cat "$OUT/gpu_throughput.jsonl"
tail -5 "$OUT/gpu_throughput.err"
# Issue 27: the time model against the measured step: calibrate this card, then plan gpu_throughput's shapes.
timeout 120 python3 -m lf_dist env --calibrate --output "$OUT/calibrated_profile.yaml" 2>&1 | tee "$OUT/calibrate.log"
timeout 120 python3 benchmarks/gpu_step_time.py --profile "$OUT/calibrated_profile.yaml" \
  --measured "$OUT/gpu_throughput.jsonl" 2>&1 | tee "$OUT/gpu_step_time.jsonl"
