#!/usr/bin/env bash
# zhllama on one GPU, from one prepared command (bench/gpu/README.md).
#
#   bench/gpu/run.sh prepare               here, after `make`: wheels + inputs into .gpu/ (git-ignored), checks the
#                                          carry limit, prints the device command, what to carry and the timeout
#   bench/gpu/run.sh device [--model 13b]  on the GPU machine: installs .gpu/wheels and zhllama (no deps) into a
#                                          temporary folder, runs the real stages at 7B (or 13B) shape, one table last
#   bench/gpu/run.sh device --cpu-smoke    the same script on this CPU with the tiny recipe (tests/test_bench_gpu.py)
#
# Extra arguments go to bench/gpu/prepare.py or bench/gpu/device.py (--help for theirs).
set -euo pipefail

# one function, called on the last line: bash has read the whole file before anything runs, so editing the
# script while it runs cannot change what a running copy does
main() {
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GPU_DIR=${ZHLLAMA_GPU_DIR:-$ROOT/.gpu}
cmd=${1:-help}
shift || true

case "$cmd" in
prepare)
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    [ -x "$PY" ] || PY=python3
    exec "$PY" "$ROOT/bench/gpu/prepare.py" --dir "$GPU_DIR" "$@"
    ;;
device)
    smoke=0
    for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && smoke=1; done
    if [ $smoke = 1 ]; then
        PY=${PYTHON:-$ROOT/.venv/bin/python}
        [ -x "$PY" ] || PY=python3
    else
        PY=${PYTHON:-python3}
    fi
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/zhllama-site.XXXXXX")
    BUILD=$(mktemp -d "${TMPDIR:-/tmp}/zhllama-build.XXXXXX")
    trap 'rm -rf "$SITE" "$BUILD"' EXIT
    if [ $smoke = 0 ]; then
        # the device's own torch stays; these pins replace or add only what zhllama needs beside it
        ls "$GPU_DIR"/wheels/*.whl >/dev/null 2>&1 || { echo "no wheels in $GPU_DIR/wheels: run 'bench/gpu/run.sh prepare' first and carry .gpu" >&2; exit 2; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$GPU_DIR"/wheels/*.whl
    fi
    [ -d "$GPU_DIR/inputs" ] || { echo "no $GPU_DIR/inputs: run 'bench/gpu/run.sh prepare' first" >&2; exit 2; }
    # zhllama itself, as a user installs it, without dependencies; built from a copy so the checkout stays clean
    tar -C "$ROOT" --exclude=./.git --exclude=./.gpu --exclude=./.venv --exclude=./.cache --exclude=./runs \
        --exclude=./build --exclude='*.egg-info' -cf - . | tar -C "$BUILD" -xf -
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE" "$BUILD"; then
        # no usable setuptools there: the same packages copied in place of an install
        echo "pip could not build zhllama here; copying its packages into $SITE instead" >&2
        for pkg in $("$PY" -c "import re; t = open('$BUILD/pyproject.toml').read(); print(' '.join(re.findall(r'\"([^\"]+)\"', re.search(r'^packages\s*=\s*\[([^\]]*)\]', t, re.M).group(1))))"); do
            cp -r "$BUILD/$pkg" "$SITE/"
        done
    fi
    export PYTHONPATH="$SITE" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    (cd "$SITE" && "$PY" -c "import transformers, peft, datasets, sentencepiece, google.protobuf, zhllama, sft.packing; print('installed:', zhllama.__file__)")
    "$PY" "$ROOT/bench/gpu/device.py" --inputs "$GPU_DIR/inputs" "$@"
    ;;
*)
    sed -n '2,10p' "$0"
    [ "$cmd" = help ] || exit 2
    ;;
esac
}

main "$@"
