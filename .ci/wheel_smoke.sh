#!/usr/bin/env bash
# The installed package works: build the wheel, install it (not editable) into a fresh venv and run the README's
# first commands from a folder outside the checkout. The venv reuses the dependencies of the project's venv (a .pth
# line pointing at its site-packages, written after the install so pip never sees the editable install there);
# erase itself must come from the wheel, which is checked before any command runs.
#
#   .ci/wheel_smoke.sh                       # uses .venv/bin/python (make venv)
#   PY=/path/to/python .ci/wheel_smoke.sh    # another interpreter with the dependencies installed
#
# Each step prints "wheel smoke: ok (N s): STEP"; a failing step prints its last output lines and then one line
# "wheel smoke: FAILED: STEP (exit N)", and the script exits 1.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/erase-wheel-smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=1
unset PYTHONPATH  # the checkout must not be importable: everything below runs the installed wheel
START=$SECONDS

fail() {
    echo "wheel smoke: FAILED: $*" >&2
    exit 1
}

# step NAME COMMAND...: run COMMAND, its output in $WORK/log; on failure show the log's tail and stop
step() {
    local name="$1" t0=$SECONDS rc
    shift
    "$@" >"$WORK/log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ]; then
        tail -n 25 "$WORK/log" >&2
        fail "$name (exit $rc)"
    fi
    echo "wheel smoke: ok ($((SECONDS - t0)) s): $name"
}

[ -x "$PY" ] || fail "no interpreter at $PY; run 'make venv' or pass PY=/path/to/python"

# A copy of the sources, so that the build's build/ and *.egg-info folders (and a stale build/lib) never touch
# the checkout.
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
step "copy the sources" tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' \
    -cf "$WORK/src.tar" pyproject.toml README.md MANIFEST.in erase pipelines prompts eval
tar -C "$WORK/src" -xf "$WORK/src.tar"
step "build the wheel" "$PY" -m pip wheel --no-deps --no-build-isolation --quiet -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/erase-*.whl)"
step "create a fresh venv" "$PY" -m venv --without-pip "$WORK/venv"
step "install $(basename "$WHEEL") (not editable)" \
    "$PY" -m pip --python "$WORK/venv/bin/python" install --no-deps --no-index --quiet "$WHEEL"
NEW_SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
DEPS_SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
echo "$DEPS_SITE" >"$NEW_SITE/_erase_smoke_dependencies.pth"

cd "$WORK/run" || fail "cd $WORK/run"
ERASE="$WORK/venv/bin/erase"
step "erase comes from the wheel" "$WORK/venv/bin/python" -c "
import sys, erase, erase.methods, erase.training, erase.commands, eval.attacks, pipelines.shapes, prompts
for m in (erase, erase.methods, erase.training, erase.commands, eval.attacks, pipelines.shapes, prompts):
    assert m.__file__.startswith('$NEW_SITE/'), f'{m.__name__} imported from {m.__file__}, not the wheel'
"
step "erase train --list" "$ERASE" train --list
step "erase train --method uce --concept red" \
    "$ERASE" train --method uce --concept red --out uce-red.safetensors --quiet
step "erase inspect" "$ERASE" inspect uce-red.safetensors
step "erase eval (one seed)" "$ERASE" eval --concept red --patch uce-red.safetensors --seeds-per-prompt 1 \
    --max-per-template 1 --out eval-red --quiet
[ -s eval-red/metrics.json ] || fail "erase eval wrote no eval-red/metrics.json"
step "erase attack --attacks prefix --cases 2" "$ERASE" attack --concept red --patch uce-red.safetensors \
    --attacks prefix --cases 2 --out attack-red --quiet
[ -s attack-red/attack.json ] || fail "erase attack wrote no attack-red/attack.json"
echo "wheel smoke: passed in $((SECONDS - START)) s"
