#!/usr/bin/env bash
# Wheels the GPU machine lacks for align, for its Python 3.12 on manylinux x86-64, into benchmarks/gpu/wheels/.
#
#   bash benchmarks/gpu/wheels.sh            # download + build, check the size, print the carry list
#   bash benchmarks/gpu/wheels.sh --dry-run  # print what would be fetched or built (no network)
#   bash benchmarks/gpu/wheels.sh --with-pyarrow  # also pyarrow (52.5 MiB: 62 MiB in all, just under the limit)
#
# The GPU machine (device README, KINDS.md "Python packages already there", read 2026-11-17) has torch,
# transformers, accelerate, huggingface-hub, tokenizers, safetensors, numpy, pandas, pyarrow, fsspec, xxhash,
# requests, sympy, matplotlib, tqdm, pyyaml, psutil, msgpack, ninja, einops and py-cpuinfo, and no package index.
# What align's dependencies need beyond that travels here, pinned to the versions installed in .venv, so that the
# GPU run uses what the tests passed with. peft is on the GPU machine too, in a version nobody has read; align pins
# peft 0.21 (pyproject), so the tested peft travels as well (pure Python, < 1 MB). DeepSpeed is built here from
# its sdist with no prebuilt ops (DS_BUILD_OPS=0: a pure-Python wheel; ops are JIT-compiled on first use), and
# align itself is built from this checkout. pyarrow is on the GPU machine in a version nobody has read; datasets 5.2
# needs pyarrow >= 24. If run.sh's first lines say it is older, rerun this with --with-pyarrow (the cp312 wheel is
# 52.5 MiB, so it fits only with little else in the tree).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DEST_REL=benchmarks/gpu/wheels
DEST=$ROOT/$DEST_REL
LIMIT_MIB=64  # the device tool's limit on everything that travels: working tree + carried paths

# Missing there, with the packages they need that are missing there too (Requires-Dist read from .venv):
# trl -> datasets -> dill, multiprocess; math-verify -> latex2sympy2_extended -> antlr4-python3-runtime;
# deepspeed -> hjson, pydantic -> pydantic_core, annotated-types, typing-inspection; align -> gguf.
PACKAGES=(
    trl datasets dill multiprocess
    math-verify latex2sympy2_extended antlr4-python3-runtime
    hjson pydantic pydantic_core annotated-types typing-inspection
    gguf peft
)
BUILT_FROM_SDIST=deepspeed

dry_run=0
for option in "$@"; do
    case "$option" in
        --dry-run) dry_run=1 ;;
        --with-pyarrow) PACKAGES+=(pyarrow) ;;
        *) echo "wheels.sh: unknown option '$option' (use --dry-run, --with-pyarrow or nothing)" >&2; exit 2 ;;
    esac
done

if [[ ! -x $PYTHON ]]; then
    echo "wheels.sh: no Python at $PYTHON: create the venv (README, Install) or set PYTHON=..." >&2
    exit 2
fi

# name==version for each package, as installed in the venv the tests ran in.
mapfile -t PINS < <("$PYTHON" - "${PACKAGES[@]}" "$BUILT_FROM_SDIST" <<'EOF'
import importlib.metadata as metadata
import sys

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"wheels.sh: not installed in this venv: {', '.join(missing)} (pip install -e '.[deepspeed]')")
EOF
)
DEEPSPEED_PIN=${PINS[-1]}
unset 'PINS[-1]'
ALIGN_VERSION=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('align'))")

if (( dry_run )); then
    echo "download (cp312, manylinux x86-64 or pure Python, no dependencies):"
    printf '  %s\n' "${PINS[@]}"
    echo "build from sdist with DS_BUILD_OPS=0: $DEEPSPEED_PIN"
    echo "build from this checkout: align==$ALIGN_VERSION"
    echo "into: $DEST_REL"
    echo "carry: [\"$DEST_REL\"]"
    exit 0
fi

rm -rf "$DEST"
mkdir -p "$DEST"
# --only-binary with the target's tags: compiled packages come as cp312 manylinux wheels, pure ones as py3 wheels.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" "${PINS[@]}"
# No build isolation: DeepSpeed's setup.py imports torch, which the venv has (an isolated build would download it).
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED_PIN"
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$ROOT"

for wheel in "$DEST"/*.whl; do
    case "$(basename "$wheel")" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-py312-none-any.whl | *-cp312-*manylinux*x86_64*.whl) ;;
        *) echo "wheels.sh: $(basename "$wheel") does not install on CPython 3.12 x86-64" >&2; exit 1 ;;
    esac
done

wheels_bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
# What else travels: tracked files and untracked files git does not ignore (the device tool's working tree).
tree_bytes=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null \
    | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
total=$((wheels_bytes + tree_bytes))
ls -1 "$DEST"
echo "wheels: $(ls "$DEST"/*.whl | wc -l) files, $(mib "$wheels_bytes") MiB; working tree $(mib "$tree_bytes") MiB;" \
    "total $(mib "$total") MiB of $LIMIT_MIB MiB"
if (( total >= LIMIT_MIB * 1048576 )); then
    echo "wheels.sh: $(mib "$total") MiB would travel, over the device tool's $LIMIT_MIB MiB: drop a package" >&2
    exit 1
fi
echo "carry: [\"$DEST_REL\"]"
