#!/usr/bin/env bash
# GPU smoke runs and CUDA benchmarks, for a lent GPU machine (a few minutes).
#
#   bash bench/gpu.sh [OUT_DIR]        (default: $OUT if set, else /tmp/strlowrank_gpu)
#
# Uses the preinstalled python (.venv/bin/python if present, else $PYTHON, else python);
# installs nothing and needs no network. Every step has its own timeout and a failure does not
# stop the next step; the summary at the end lists each step's exit status (124 = timeout).
set -x
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="${PYTHON:-python}"; fi
TORCHRUN=("$PY" -m torch.distributed.run)
OUT_DIR="${1:-${OUT:-/tmp/strlowrank_gpu}}"
mkdir -p "$OUT_DIR"
STATUS=()

step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, log to OUT_DIR/NAME.log, record rc
  local name="$1" limit="$2"; shift 2
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT_DIR/$name.log"
  STATUS+=("$name=$rc")
}

step env 60 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))'"

# Vision track, 1 epoch with bf16 autocast: the shipped Fashion-MNIST subset (no download).
step vision_amp 300 "$PY" vision/train.py --epochs 1 --device cuda --train.amp bf16 \
  --model.name resnet20 --method.name str --train.progress false --out "$OUT_DIR/vision_amp"
# The same through torchrun with one process (DDP code path, nccl).
step vision_ddp1 300 "${TORCHRUN[@]}" --standalone --nproc_per_node=1 vision/train.py --epochs 1 \
  --device cuda --train.amp bf16 --method.name str --train.progress false --out "$OUT_DIR/vision_ddp"

# Speech track: a small synthetic tree (espeak-ng, 40 speakers, ~600 clips), 1 epoch bf16.
# The GPU machines lack espeakng-loader: generate the tree here first and carry it, e.g.
#   python -c "from speech.synth import SynthConfig, generate_dataset as g; \
#              g('shared/speech_tiny', SynthConfig(n_speakers=40), progress=False)"
#   SPEECH_TREE=shared/speech_tiny bash bench/gpu.sh
SPEECH="${SPEECH_TREE:-$OUT_DIR/speech_data}"
if [[ ! -d "$SPEECH" ]]; then
  step speech_data 300 "$PY" -c "
from speech.synth import SynthConfig, generate_dataset
generate_dataset('$SPEECH', SynthConfig(n_speakers=40, workers=8), progress=False)"
fi
step speech_amp 300 "$PY" speech/train_gru.py --data-dir "$SPEECH" --epochs 1 \
  --device cuda --train.amp bf16 --train.progress false --out "$OUT_DIR/speech_amp"
step speech_ddp1 300 "${TORCHRUN[@]}" --standalone --nproc_per_node=1 speech/train_gru.py \
  --data-dir "$SPEECH" --epochs 1 --device cuda --train.amp bf16 \
  --train.progress false --out "$OUT_DIR/speech_ddp"
# The compiled GRU export and the sparse CNN export on this machine's CPU (P3 / P4, quick).
step bench_p3_cpu 300 "$PY" -m bench.bench_rnn --part p3 --threads 4 --repeats 3 \
  --json "$OUT_DIR/p3_cpu.json"

# Benchmarks on CUDA: P1 (STR step overhead) and P2 (GRU training step); P3/P4 are CPU exports.
step bench_p1_cuda 300 "$PY" -m bench.bench_str_overhead --device cuda --repeats 10 --warmup 3 \
  --json "$OUT_DIR/p1_cuda.json"
# P1 at training shapes: dense vs STR, NCHW and channels_last, bf16 autocast, 224 px, batch 256
# (goal <= 1.05x) and 32 (goal <= 1.3x); x_dense is relative to dense in the same format.
step bench_p1_cuda_formats 420 "$PY" -m bench.bench_str_overhead --device cuda --amp bf16 \
  --cases resnet50:256:224 mobilenet_v1:256:224 resnet50:32:224 mobilenet_v1:32:224 \
  --formats contiguous channels_last --variants dense str --repeats 10 --warmup 3 \
  --json "$OUT_DIR/p1_cuda_formats.json"
step bench_p2_cuda 200 "$PY" -m bench.bench_rnn --part p2 --device cuda --repeats 10 --warmup 3 \
  --json "$OUT_DIR/p2_cuda.json"

set +x
echo "gpu.sh summary (exit status per step; 0 ok, 124 timeout): ${STATUS[*]}"
echo "logs and JSON in $OUT_DIR"
