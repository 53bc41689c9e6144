#!/usr/bin/env bash
# The GPU kit in one command (docs/gpu.md).
#
#   bash benchmarks/gpu/run.sh OUTDIR                      # on the GPU machine: install the carried wheels, run
#   bash benchmarks/gpu/run.sh --tiny --device cpu OUTDIR  # here / in CI: tiny models, no install
#
# Writes OUTDIR/gpu.jsonl (one JSON line per check), OUTDIR/gpu.md (the table) and OUTDIR/run.log. Without --tiny it
# first installs benchmarks/gpu/wheels/*.whl (made by wheels.sh) into a target folder with no network and no
# dependency resolution, and puts that folder first on PYTHONPATH, so the carried versions win over the machine's own.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tiny=0
device=cuda
out=
while (( $# )); do
    case "$1" in
        --tiny) tiny=1 ;;
        --device) device=${2:?--device needs cpu or cuda}; shift ;;
        --device=*) device=${1#--device=} ;;
        -h | --help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "run.sh: unknown option '$1' (use --tiny, --device cpu|cuda, OUTDIR)" >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
if [[ -z $out ]]; then
    echo "run.sh: give the output directory, e.g. bash benchmarks/gpu/run.sh \$OUT" >&2
    exit 2
fi
case "$device" in cpu | cuda | cuda:*) ;; *) echo "run.sh: --device $device: use cpu or cuda" >&2; exit 2 ;; esac
mkdir -p "$out"
out=$(cd "$out" && pwd)
# The whole log comes back as a file too (the device tool returns only the output's last 12,000 characters).
exec > >(tee "$out/run.log") 2>&1
tee_pid=$!
trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT  # let tee write the last lines before the command returns

# The venv of this checkout where there is one (here, CI); the machine's python3 elsewhere (the GPU machine).
PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
# No progress bars (dataset maps, weight loading) in the log: it comes back as its last 12,000 characters.
export HF_DATASETS_DISABLE_PROGRESS_BARS=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1
# The checks set their precision themselves (bf16 autocast on CUDA, float32 on CPU), whatever `auto` would pick.
export ALIGN_PRECISION=${ALIGN_PRECISION:-fp32}

if (( tiny )); then
    # One thread: the tiny model's matmuls gain nothing from a second, and on a loaded 2-core machine two threads
    # that wait for each other made each one 100x slower (0.14 ms -> 19 ms for a 512 x 64 x 128 matmul).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    wheels=$ROOT/benchmarks/gpu/wheels
    if ! ls "$wheels"/*.whl > /dev/null 2>&1; then
        echo "run.sh: no wheels in $wheels: run 'bash benchmarks/gpu/wheels.sh' here first and carry that folder" >&2
        exit 2
    fi
    site=${GPU_KIT_SITE:-/tmp/align-gpu-kit-site}
    began=$SECONDS
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl
    echo "[gpu-kit] installed $(ls "$wheels"/*.whl | wc -l) wheels into $site in $((SECONDS - began)) s" >&2
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    # DeepSpeed JIT-compiles its ops (the wheel has none prebuilt) into a cache of its own.
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/align-gpu-kit-torch-extensions}
fi

echo "[gpu-kit] python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv >&2 || true
fi
"$PYTHON" - <<'EOF' >&2
import importlib.metadata as m
for name in ("align", "torch", "transformers", "trl", "accelerate", "peft", "datasets", "deepspeed", "pyarrow"):
    try:
        print(f"[gpu-kit] {name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"[gpu-kit] {name} not installed")
EOF

args=(--device "$device" --out "$out")
(( tiny )) && args+=(--tiny)
cd "$ROOT"
"$PYTHON" -m benchmarks.gpu.checks "${args[@]}"
cat "$out/gpu.md"
