#!/usr/bin/env bash
# Ray for the peer benchmark (benches/peers): a virtualenv with pinned Ray and NumPy.
#
#   python=$(benches/peers/setup-ray.sh | tail -1)
#   "$python" benches/peers/ray_peer.py --out ray.json
#
# The venv lives at ${SKYWARD_RAY_VENV:-/var/tmp/skyward-ray}, outside the work tree so it
# survives `cargo clean` and fresh clones. Idempotent: a venv that already imports the pinned
# Ray is left as it is. The venv's python path is the last line of stdout; pip's output
# goes to stderr.
set -euo pipefail

RAY_VERSION=2.60.0
NUMPY_VERSION=2.4.6
VENV=${SKYWARD_RAY_VENV:-/var/tmp/skyward-ray}
PY="$VENV/bin/python"

have_ray() {
    [ -x "$PY" ] && "$PY" -c "import ray, numpy, sys; sys.exit(ray.__version__ != '$RAY_VERSION' or numpy.__version__ != '$NUMPY_VERSION')" 2>/dev/null
}

if ! have_ray; then
    echo "setup-ray: installing ray==$RAY_VERSION numpy==$NUMPY_VERSION into $VENV" >&2
    [ -x "$PY" ] || python3 -m venv "$VENV" >&2
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    "$PY" -m pip install -q --disable-pip-version-check "ray==$RAY_VERSION" "numpy==$NUMPY_VERSION" >&2
    have_ray || { echo "setup-ray: ray $RAY_VERSION is not importable after install" >&2; exit 1; }
fi

echo "$PY"
