#!/usr/bin/env bash
# build.sh: rebuild the shipped WebAssembly plugins from source and build the wheel.
# Run `bash build.sh help` for the subcommands.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

# The compiler version decides the bytes of the committed .wasm files, so it is pinned.
ZIGLANG_VERSION="${ZIGLANG_VERSION:-0.17.1}"

usage() {
    cat <<EOF
Usage: bash build.sh COMMAND

Commands:
  plugins   rebuild every plugin under plugins/ from source (C with ziglang,
            WAT with wasmtime.wat2wasm) and rewrite each frys-plugin.toml's sha256
  wheel     build the frys-edge wheel into dist/
  binary    build the static single-file binary dist/frys (targets/linux-musl/build.sh)
  wasm32    build the Pyodide bundle dist/wasm32/ (targets/wasm32/build.sh)
  all       plugins, wheel, binary, then wasm32
  help      show this message

Tools come from PyPI into .venv (created if missing): ziglang==$ZIGLANG_VERSION
(override with ZIGLANG_VERSION=...) and wasmtime. No system compiler is needed.
EOF
}

PY=""

python_env() {
    if [[ ! -x .venv/bin/python ]]; then
        echo "build.sh: creating .venv" >&2
        python3 -m venv .venv
    fi
    PY=".venv/bin/python"
}

installed_version() {
    "$PY" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1"
}

ensure_plugin_tools() {
    python_env
    if [[ "$(installed_version ziglang)" != "$ZIGLANG_VERSION" ]]; then
        "$PY" -m pip install --quiet "ziglang==$ZIGLANG_VERSION"
    fi
    if [[ -z "$(installed_version wasmtime)" ]]; then
        "$PY" -m pip install --quiet wasmtime
    fi
}

# A reactor: no libc, no entry point, only what the source marks with export_name.
build_c_reactor() {
    local src="$1" out="$2"
    "$PY" -m ziglang cc --target=wasm32-freestanding -Os -nostdlib -Wall -Wextra \
        -Wl,--no-entry -Wl,-z,stack-size=16384 -Wl,--strip-all -o "$out" "$src"
    chmod 644 "$out"
}

# A WASI command: main() with wasi-libc, exported as _start.
build_c_command() {
    local src="$1" out="$2"
    "$PY" -m ziglang cc --target=wasm32-wasi -Os -Wall -Wextra \
        -Wl,-z,stack-size=16384 -Wl,--strip-all -o "$out" "$src"
    chmod 644 "$out"
}

build_wat() {
    local src="$1" out="$2"
    "$PY" -c 'import sys, wasmtime
with open(sys.argv[1]) as f:
    wasm = wasmtime.wat2wasm(f.read())
with open(sys.argv[2], "wb") as f:
    f.write(wasm)' "$src" "$out"
}

# Rewrites the sha256 line of MANIFEST with the hash of WASM.
set_sha256() {
    local manifest="$1" wasm="$2"
    "$PY" -c 'import hashlib, pathlib, re, sys
manifest, wasm = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
digest = hashlib.sha256(wasm.read_bytes()).hexdigest()
text, count = re.subn(r"(?m)^sha256 = \"[0-9a-f]*\"$", f"sha256 = \"{digest}\"", manifest.read_text())
if count != 1:
    sys.exit(f"build.sh: {manifest} needs exactly one line sha256 = \"...\"")
manifest.write_text(text)
print(f"  {str(wasm):<40} {wasm.stat().st_size:>6} bytes  sha256 {digest[:16]}...")' "$manifest" "$wasm"
}

build_plugins() {
    ensure_plugin_tools
    echo "build.sh: building plugins with ziglang $ZIGLANG_VERSION" >&2

    build_c_reactor plugins/anomaly/anomaly.c plugins/anomaly/anomaly.wasm
    set_sha256 plugins/anomaly/frys-plugin.toml plugins/anomaly/anomaly.wasm

    build_wat plugins/hello/hello.wat plugins/hello/hello.wasm
    set_sha256 plugins/hello/frys-plugin.toml plugins/hello/hello.wasm

    build_c_command plugins/upper/upper.c plugins/upper/upper.wasm
    set_sha256 plugins/upper/frys-plugin.toml plugins/upper/upper.wasm
    build_c_command plugins/readfile/readfile.c plugins/readfile/readfile.wasm
    set_sha256 plugins/readfile/frys-plugin.toml plugins/readfile/readfile.wasm

    local name dir
    for name in spin membomb recurse hugeout sneaky; do
        dir="plugins/hostile/$name"
        build_wat "$dir/$name.wat" "$dir/$name.wasm"
        set_sha256 "$dir/frys-plugin.toml" "$dir/$name.wasm"
    done

    # tampered: hello's module and hash, then one byte of the module changed
    # ("world" -> "w0rld"), so it still compiles and only the hash check catches it.
    dir="plugins/hostile/tampered"
    cp plugins/hello/hello.wasm "$dir/tampered.wasm"
    set_sha256 "$dir/frys-plugin.toml" "$dir/tampered.wasm"
    "$PY" -c 'import pathlib, sys
path = pathlib.Path(sys.argv[1])
data = path.read_bytes()
if data.count(b"world") != 1:
    sys.exit(f"build.sh: expected one \"world\" in {path}")
path.write_bytes(data.replace(b"world", b"w0rld"))' "$dir/tampered.wasm"
    echo "  $dir/tampered.wasm  one byte changed after hashing" >&2
}

build_wheel() {
    python_env
    mkdir -p dist
    if "$PY" -c 'import build' 2>/dev/null; then
        "$PY" -m build --wheel --outdir dist .
    else
        "$PY" -m pip wheel --no-deps --wheel-dir dist .
    fi
}

case "${1:-help}" in
    plugins) build_plugins ;;
    wheel) build_wheel ;;
    binary) bash targets/linux-musl/build.sh ;;
    wasm32) bash targets/wasm32/build.sh ;;
    all)
        build_plugins
        build_wheel
        bash targets/linux-musl/build.sh
        bash targets/wasm32/build.sh
        ;;
    help | -h | --help) usage ;;
    *)
        echo "build.sh: unknown command '$1'" >&2
        usage >&2
        exit 2
        ;;
esac
