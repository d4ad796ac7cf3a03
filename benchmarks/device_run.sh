#!/usr/bin/env bash
# Issue 12's device run: the one prepared command for the lent GPU machine (device tool), with
# the diffusers, importlib_metadata and PyAV wheels carried in .whl (see the README's
# "GPU figures"). Writes everything to $OUT/h200.txt as it goes; each benchmark has its own
# time limit so a slow compile cannot cost the others' figures.
#   SIZE=tiny DEVICE=cpu OUT=/tmp/x bash benchmarks/device_run.sh    # the same run, checked on a CPU
# The wheels (the GPU machine has torch, transformers, numpy, opencv, scikit-image; 42 MB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     diffusers==0.42.1 av==18.1.0 importlib_metadata
set -uo pipefail
OUT=${OUT:-/tmp/device-run}
SIZE=${SIZE:-paper}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
log="$OUT/h200.txt"
if [ "$DEVICE" = cuda ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 || echo "no nvidia-smi"
  $PY -c "import torch, diffusers, transformers, av; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, \
'| av', av.__version__)"
  echo "CPU cores: $(nproc)"
} 2>&1 | tee "$log"
if [ "$SIZE" = tiny ]; then
  C="--size tiny --device $DEVICE --batches 2,4 --fp32-batches 2 --seconds 0.2 --graph-batches 4 --compile-batch 4"
  S="--size tiny --device $DEVICE --frames 12 --hubert-seconds 5 --segments 3 --batch 4"
else
  # COMPLETION_ARGS replaces the defaults, e.g. the next run's "--eager 2,5 --graph-of 5
  # --compile-of 5 --batches 64,256 --fp32-batches 8"
  C="--device $DEVICE ${COMPLETION_ARGS:---seconds 1 --batches 8,16,32,64,128,256 --graph-batches 64,256 --compile-batch 128}"
  S="--device $DEVICE"
fi
echo "== benchmarks/gpu_completion.py $C --compile ${COMPILE-default}" | tee -a "$log"
timeout ${COMPLETION_LIMIT:-300} $PY benchmarks/gpu_completion.py $C --compile "${COMPILE-default}" 2>&1 \
  | tee "$OUT/completion_raw.txt" | grep --line-buffered -v "UserWarning\|Casting directly\|warn_once\|^ *$\|^This call\|^  File\|^    \|Dynamo detected" | tee -a "$log"
echo "== benchmarks/gpu_segment.py $S" | tee -a "$log"
timeout ${SEGMENT_LIMIT:-150} $PY benchmarks/gpu_segment.py $S 2>&1 | tee "$OUT/segment_raw.txt" \
  | grep --line-buffered -v "UserWarning\|warn_once\|^ *$" | tee -a "$log"
echo "== done $(date -u)" | tee -a "$log"
