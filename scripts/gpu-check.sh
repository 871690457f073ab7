#!/usr/bin/env bash
# gpu-check.sh — exercises the CUDA backend on one GPU (single-GPU mode:
# every pipeline rank and tensor-parallel shard in one process, each on its
# own CUDA streams).
#
# For 1F1B and STP at p = 4 it
#   1. compiles the schedule (stpc),
#   2. runs one training step on the GPU with a small model and compares
#      every weight gradient with a sequential CPU run: the largest
#      difference must stay within TOLERANCE of the tensor's largest value
#      (cuBLAS sums in another order, and the GPU's tanh differs in its
#      last bits, so bit equality is not expected),
#   3. runs a larger model and prints the measured makespan against the
#      simulator's under the pass times measured in that run.
# Then it runs STP tp=2 in multi-process mode (`stp-exec launch`: one
# process per pipeline rank, as torchrun starts them): on one GPU every
# process shares GPU 0 and transfers go through host memory; with a GPU
# per rank it also runs them over NCCL, and with two per rank each shard
# on its own GPU (NCCL all-reduces between them).
#
# Usage: scripts/gpu-check.sh              (builds with cargo if it can)
#        STP_BIN=dir scripts/gpu-check.sh  (uses prebuilt stpc and stp-exec from dir,
#                                           built with `--features stp-exec/cuda`)
#        BACKEND=streams HIDDEN=16 ROWS=8 scripts/gpu-check.sh
#                                          (a dry run of this script without a GPU:
#                                           the same stream logic on host memory)
# Last, the torch part (scripts/gpu-torch-check.py) where PyTorch with CUDA
# is installed.
# Budget: under 5 minutes on one H100 once built (plus a minute for torch).
set -euo pipefail
cd "$(dirname "$0")/.."

TOLERANCE=${TOLERANCE:-1e-4}
BACKEND=${BACKEND:-cuda}
SMALL=(--hidden 64 --rows 32)
LARGE=(--hidden "${HIDDEN:-1024}" --rows "${ROWS:-4096}")

if [[ -n "${STP_BIN:-}" ]]; then
  bin=$STP_BIN
elif command -v cargo >/dev/null; then
  echo "== building stpc and stp-exec with --features stp-exec/cuda"
  cargo build --release -q -p stpc -p stp-exec --features stp-exec/cuda
  bin=target/release
else
  echo "error: no cargo here and STP_BIN is not set; build elsewhere with" >&2
  echo "  cargo build --release -p stpc -p stp-exec --features stp-exec/cuda" >&2
  echo "and run STP_BIN=target/release $0" >&2
  exit 2
fi

# cudarc opens libcublas.so / libnvrtc.so / libnccl.so by these names; toolkits and
# pip wheels often ship only libcublas.so.13 and the like.
libs=$(mktemp -d)
trap 'rm -rf "$libs" "$work"' EXIT
work=$(mktemp -d)
for lib in cublas cublasLt nvrtc nccl; do
  found=$( (ldconfig -p 2>/dev/null | awk -v l="lib$lib.so" '$1 ~ "^"l {print $NF}';
            find /usr/local/cuda*/ /usr/lib /opt "$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || echo /nonexistent)" \
                 -name "lib$lib.so*" 2>/dev/null) | head -1 || true)
  if [[ -n "$found" ]]; then
    ln -sf "$found" "$libs/lib$lib.so"
    echo "lib$lib.so -> $found"
  fi
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

status=0
check() {
  local name=$1 m=$2 tp=$3
  local program="$work/$name-tp$tp/program.json"
  echo
  echo "== $name p=4 m=$m tp=$tp"
  "$bin/stpc" compile "$name" -p 4 -m "$m" --tp "$tp" -o "$work/$name-tp$tp" >/dev/null 2>"$work/stpc.log" ||
    { cat "$work/stpc.log" >&2; exit 1; }
  echo "-- gradients (hidden 64, rows 32) against a sequential CPU run"
  if ! "$bin/stp-exec" run "$program" --backend "$BACKEND" --check --tolerance "$TOLERANCE" "${SMALL[@]}"; then
    status=1
  fi
  echo "-- timing (${LARGE[*]})"
  if ! "$bin/stp-exec" run "$program" --backend "$BACKEND" "${LARGE[@]}" --timeout 60; then
    status=1
  fi
}

check 1f1b 8 1
check stp 11 1
check stp 11 2

multi() {
  local transport=$1; shift
  echo
  echo "== stp p=4 m=11 tp=2, one process per pipeline rank, transfers: $transport"
  if ! timeout 120 "$bin/stp-exec" launch "$work/stp-tp2/program.json" --backend "$BACKEND" --transport "$transport" \
       "$@" --check --tolerance "$TOLERANCE" "${SMALL[@]}" --timeout 60; then
    status=1
  fi
}
multi host --device 0
gpus=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
if [[ $BACKEND == cuda && $gpus -ge 4 ]]; then
  multi nccl
  if [[ $gpus -ge 8 ]]; then multi nccl --gpu-per-shard; fi
else
  echo
  echo "(NCCL between processes needs a GPU per pipeline rank: $gpus here; not run)"
fi

# The torch part: stp.torch runs a braid's two passes on two CUDA streams
# (scripts/gpu-torch-check.py). Needs PyTorch with CUDA on this machine
# (PYTHON, default python3) and the stp package: the native module is built
# here (no network needed) and laid out beside python/stp.
echo
echo "== stp.torch: a braided order on two CUDA streams vs the same order split"
python=${PYTHON:-python3}
if [[ $BACKEND == cuda ]] && "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  if [[ -n "${STP_BIN:-}" && -f "$STP_BIN/lib_stp.so" ]]; then native="$STP_BIN/lib_stp.so"
  else cargo build --release -q -p stp-python && native=target/release/lib_stp.so; fi
  mkdir -p "$work/py/stp" && cp python/stp/*.py python/stp/*.pyi "$work/py/stp/" && cp "$native" "$work/py/stp/_stp.abi3.so"
  if ! PYTHONPATH="$work/py" timeout 300 "$python" scripts/gpu-torch-check.py; then status=1; fi
else
  echo "(no PyTorch with CUDA for $python here; not run. DEVICE=cpu $python scripts/gpu-torch-check.py dry-runs it)"
fi

echo
if [[ $status -eq 0 ]]; then echo "gpu-check: all passed"; else echo "gpu-check: FAILED"; fi
exit $status
