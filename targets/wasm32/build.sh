#!/usr/bin/env bash
# targets/wasm32/build.sh: assemble the Pyodide bundle dist/wasm32/ (run as `bash build.sh wasm32`).
#
# Pyodide itself comes from the npm package `pyodide` (node_modules/pyodide, installed by
# `npm ci`); its runtime files are copied into the bundle so a browser loads them from the
# same origin, offline. Python wheels come from PyPI through pip into build/wasm32/wheels
# (a cache): msgspec's pyemscripten wheel for Pyodide's ABI, the pure-Python wheels as they
# are, and PyYAML, which publishes no pure wheel, as one built here from its sdist (pure
# Python, without libyaml). frys_edge is built as a wheel from this checkout.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$PWD"
SRC="targets/wasm32"
OUT="dist/wasm32"
CACHE="build/wasm32"
PYODIDE_NPM="node_modules/pyodide"

if [[ ! -x .venv/bin/python ]]; then
    echo "wasm32: creating .venv" >&2
    python3 -m venv .venv
fi
PY="$ROOT/.venv/bin/python"

if [[ ! -f "$PYODIDE_NPM/pyodide.asm.wasm" ]]; then
    echo "wasm32: $PYODIDE_NPM is missing; installing the npm packages (npm ci)" >&2
    npm ci --no-audit --no-fund
fi

# Pyodide's ABI and Python version decide which compiled wheels fit: read them from its lock file.
read -r PY_VERSION PLATFORM < <("$PY" -c 'import json, sys
info = json.load(open(sys.argv[1]))["info"]
major_minor = ".".join(info["python"].split(".")[:2])
print(major_minor, "pyemscripten_%s_%s" % (info["abi_version"], info["arch"]))' \
    "$PYODIDE_NPM/pyodide-lock.json")
if [[ -z "${PLATFORM:-}" ]]; then
    echo "wasm32: cannot read Pyodide's platform from $PYODIDE_NPM/pyodide-lock.json" >&2
    exit 1
fi
ABI="cp${PY_VERSION/./}"
echo "wasm32: Pyodide for Python $PY_VERSION, platform $PLATFORM" >&2

# The runtime dependencies from pyproject.toml, PyYAML aside (built below).
mapfile -t DEPS < <("$PY" -c 'import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.lower().startswith("pyyaml")))')
YAML_REQ="$("$PY" -c 'import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in deps if d.lower().startswith("pyyaml")))')"

# Fresh each build, so only the versions resolved now are shipped (pip's own cache keeps
# repeated builds from downloading again).
rm -rf "$CACHE"
mkdir -p "$CACHE/wheels" "$CACHE/sdist" "$CACHE/frys"

echo "wasm32: downloading wheels for ${DEPS[*]}" >&2
"$PY" -m pip download --quiet --dest "$CACHE/wheels" --only-binary=:all: \
    --platform "$PLATFORM" --platform any --python-version "$PY_VERSION" \
    --implementation cp --abi "$ABI" --abi none "${DEPS[@]}"

echo "wasm32: building a pure-Python wheel of $YAML_REQ from its sdist" >&2
"$PY" -m pip download --quiet --dest "$CACHE/sdist" --no-deps --no-binary=:all: "$YAML_REQ"
"$PY" "$SRC/bundle.py" pure-wheel "$CACHE"/sdist/*.tar.gz "$CACHE/wheels"

echo "wasm32: building the frys_edge wheel" >&2
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$CACHE/frys" .

rm -rf "$OUT"
mkdir -p "$OUT/pyodide" "$OUT/wheels" "$OUT/app/plugins/anomaly" "$OUT/app/workflows"
for f in pyodide.mjs pyodide.asm.mjs pyodide.asm.wasm python_stdlib.zip pyodide-lock.json; do
    cp "$PYODIDE_NPM/$f" "$OUT/pyodide/"
done
cp "$CACHE"/wheels/*.whl "$CACHE"/frys/frys_edge-*.whl "$OUT/wheels/"

cp "$SRC/frys.mjs" "$SRC/demo.html" "$SRC/frys_pyodide.py" "$OUT/"
cp "$SRC/frys.toml" "$OUT/app/frys.toml"
cp examples/gateway/sensors.py "$OUT/app/sensors.py"
cp examples/gateway/workflows/read.yaml "$OUT/app/workflows/read.yaml"
cp plugins/anomaly/frys-plugin.toml plugins/anomaly/anomaly.wasm "$OUT/app/plugins/anomaly/"

"$PY" "$SRC/bundle.py" manifest "$OUT"
echo "wasm32: built $OUT ($(du -sh "$OUT" | cut -f1))" >&2
