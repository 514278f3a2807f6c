#!/usr/bin/env bash
# Every GPU check in one call (about 5 minutes on an H100), for a machine whose python3 has CUDA torch:
# the CUDA tests (graphs, the reference's captions), decoding latency (fp32 eager / graphed, bf16 graphed,
# against the naive decoder), where a caption's GPU time goes, and training speed (bf16 autocast and fp32).
# Logs go to $OUT (default runs/gpu).
#   benchmarks/gpu.sh                           # the tests' reference fixture ships in tests/fixtures
#   TRAIN_PRECISIONS="" PROFILE_GROUPS=2 DECODE_GROUPS=2,4,1 ...   # no training; profile K=2 only
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
status=0
python3 -m pytest -q -p no:cacheprovider tests/decoding/test_decoding_cuda_graphs.py tests/model/test_model_reference.py 2>&1 | tee "$out/tests.log" || status=1
python3 benchmarks/decode_profile.py --groups "${PROFILE_GROUPS-1,2,4}" 2>&1 | tee "$out/decode_profile.log" || status=1
python3 benchmarks/decode_latency.py --device cuda --repeats 5 --groups "${DECODE_GROUPS-1,2,4}" \
    --json "$out/decode_latency.json" 2>&1 | tee "$out/decode_latency.log" || status=1
for precision in ${TRAIN_PRECISIONS-bf16 fp32}; do
    python3 benchmarks/train_speed.py --device cuda --precision $precision 2>&1 | tee "$out/train_$precision.log" || status=1
done
exit $status
