#!/usr/bin/env bash
# targets/linux-musl/build.sh: build dist/frys, one statically linked ELF that runs with no
# files around it (FROM scratch, an empty chroot). Run `bash targets/linux-musl/build.sh help`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash targets/linux-musl/build.sh [build|help]
       (or `bash build.sh binary` from the repository root)

Builds dist/frys, one statically linked Linux executable (for this machine's architecture;
tested on x86_64) of the `frys` command with the `plugins` extra (wasmtime) and without
numpy (vector search then uses its pure-Python path):

  1. Debian packages it needs, if missing: python3, python3-venv, libpython3.X (the shared
     libpython PyInstaller bundles), patchelf and binutils (staticx), file
     (apt-get update first when one is missing; needs root or sudo)
  2. a build venv build/linux-musl/venv from Debian's /usr/bin/python3 (a Python whose
     binary has no RUNPATH, which staticx needs), with the pinned versions in
     targets/linux-musl/requirements.txt and this checkout installed with [plugins]
  3. PyInstaller --onefile, with wasmtime's native _libwasmtime.so collected explicitly
  4. staticx: the PyInstaller executable plus every shared library it loads (glibc among
     them) packed behind a static musl-linked loader

Environment:
  FRYS_BUILD_PYTHON   the Python to build with (default /usr/bin/python3; must not carry a
                      RUNPATH: see `readelf -d`)
  SOURCE_DATE_EPOCH   timestamp baked into the archive (default: the last commit's time)

Output: dist/frys, and its size and build time on the last lines.
EOF
}

die() {
    echo "targets/linux-musl/build.sh: $*" >&2
    exit 1
}

case "${1:-build}" in
    build) ;;
    help | -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        echo "targets/linux-musl/build.sh: unknown command '$1'" >&2
        exit 2
        ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

BUILD_PY="${FRYS_BUILD_PYTHON:-/usr/bin/python3}"
WORK="build/linux-musl"
VENV="$WORK/venv"
START=$(date +%s)
GLIBC_LIBS=()
STDLIB_FOR_PLUGINS="array configparser glob html.parser logging.handlers statistics zoneinfo
    xml.etree.ElementTree"

[[ "$(uname -s)" == "Linux" ]] || die "builds a Linux binary; run it on Linux (this is $(uname -s))"

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# Debian packages: installed only when missing, with one apt-get update before the first.
ensure_debian_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        command -v apt-get >/dev/null ||
            die "missing ${missing[*]} and no apt-get: install them with your package manager"
        echo "build.sh: apt-get install ${missing[*]}" >&2
        if [[ -z "${APT_UPDATED:-}" ]]; then
            as_root apt-get update -qq
            APT_UPDATED=1
        fi
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# python3 first, then the shared libpython of its version (PyInstaller bundles it).
ensure_system_tools() {
    ensure_debian_packages python3 python3-venv patchelf binutils file
    local version
    version="$("$BUILD_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ||
        die "cannot run $BUILD_PY"
    ensure_debian_packages "libpython$version"
}

ensure_build_venv() {
    [[ -x "$BUILD_PY" ]] || die "no Python at $BUILD_PY (set FRYS_BUILD_PYTHON)"
    if readelf -d "$(readlink -f "$BUILD_PY")" 2>/dev/null | grep -qE 'RPATH|RUNPATH'; then
        die "$BUILD_PY carries an RPATH/RUNPATH, which staticx cannot bundle; use Debian's \
/usr/bin/python3 or remove it with patchelf --remove-rpath on a copy"
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "build.sh: creating $VENV from $BUILD_PY" >&2
        "$BUILD_PY" -m venv "$VENV"
    fi
    # The pinned tools and dependencies, then this checkout itself (not editable: the
    # freeze must see an installed package with its metadata).
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$HERE/requirements.txt"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --force-reinstall "$ROOT"
}

# wasmtime's native library, zlib-compressed into a generated module of the PYZ archive, which
# is read in place: unpacked on first import by pyi_rth_wasmtime.py, not at every start.
write_libwasmtime_module() {
    local so="$1" out="$2"
    "$VENV/bin/python" - "$so" "$out" <<'PY'
import base64, hashlib, pathlib, sys, zlib
so, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
data = so.read_bytes()
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(
    '"""wasmtime\'s _libwasmtime.so for dist/frys (generated by targets/linux-musl/build.sh)."""\n'
    f"PLATFORM_DIR = {so.parent.name!r}\n"
    f"SHA256 = {hashlib.sha256(data).hexdigest()!r}\n"
    f"DATA = {base64.b64encode(zlib.compress(data, 9)).decode()!r}\n"
)
PY
}

freeze() {
    local site wasmtime_so stripped
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    wasmtime_so="$(echo "$site"/wasmtime/linux-*/_libwasmtime.so)"
    [[ -f "$wasmtime_so" ]] || die "wasmtime's native library not found under $site/wasmtime"
    mkdir -p "$WORK/gen/$(basename "$(dirname "$wasmtime_so")")"
    stripped="$WORK/gen/$(basename "$(dirname "$wasmtime_so")")/_libwasmtime.so"
    cp "$wasmtime_so" "$stripped"
    strip --strip-unneeded "$stripped"
    write_libwasmtime_module "$stripped" "$WORK/gen/_frys_libwasmtime.py"

    # PyInstaller no longer sees the library, so its dependencies are collected by hand:
    # glibc's own libraries come with staticx (-l below); the rest (libgcc_s) go in the app.
    local dep extra=()
    for dep in $(ldd "$wasmtime_so" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }'); do
        case "$(basename "$dep")" in
            libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux*)
                GLIBC_LIBS+=("$dep") ;;
            *) extra+=(--add-binary "$dep:.") ;;
        esac
    done

    # Standard library modules frys itself does not import but a native plugin (a .py file
    # named in [plugins] native) may; pure Python, so they cost size, not start time.
    local module stdlib=()
    for module in $STDLIB_FOR_PLUGINS; do stdlib+=(--hidden-import "$module"); done

    # PYTHONHASHSEED and SOURCE_DATE_EPOCH make PyInstaller's archive reproducible.
    SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
    export SOURCE_DATE_EPOCH
    PYTHONHASHSEED=0 "$VENV/bin/pyinstaller" \
        --noconfirm --clean --log-level WARN \
        --onefile --name frys --strip --noupx \
        --distpath "$WORK/pyinstaller-dist" \
        --workpath "$WORK/pyinstaller-work" \
        --specpath "$WORK" \
        --paths "$WORK/gen" \
        --collect-submodules frys_edge \
        --collect-data frys_edge \
        --hidden-import anyio._backends._asyncio \
        --hidden-import _frys_libwasmtime \
        "${stdlib[@]}" \
        --runtime-hook "$HERE/pyi_rth_wasmtime.py" \
        --runtime-hook "$HERE/pyi_rth_launcher.py" \
        --copy-metadata frys-edge \
        --copy-metadata wasmtime \
        "${extra[@]}" \
        --exclude-module numpy \
        --exclude-module cryptography \
        --exclude-module tkinter \
        "$HERE/frys_entry.py"
    if "$VENV/bin/pyi-archive_viewer" -l "$WORK/pyinstaller-dist/frys" | grep -q _libwasmtime.so; then
        die "_libwasmtime.so was collected as a file (unpacked at every start); check the hooks"
    fi
}

make_static() {
    mkdir -p dist
    rm -f dist/frys
    local lib libs=()
    for lib in "${GLIBC_LIBS[@]}"; do libs+=(-l "$lib"); done
    # staticx, with each archive member's mtime set to SOURCE_DATE_EPOCH (else the build
    # time), so the same sources give the same bytes.
    "$VENV/bin/python" - --strip --no-compress "${libs[@]}" "$WORK/pyinstaller-dist/frys" \
        dist/frys <<'PY'
import os, sys, tarfile
from staticx.__main__ import main
epoch, addfile = int(os.environ["SOURCE_DATE_EPOCH"]), tarfile.TarFile.addfile
def addfile_at_epoch(self, tarinfo, fileobj=None):
    tarinfo.mtime = epoch
    return addfile(self, tarinfo, fileobj)
tarfile.TarFile.addfile = addfile_at_epoch
sys.argv[0] = "staticx"
main()
PY
    chmod 755 dist/frys
    file dist/frys | grep -q "statically linked" || die "dist/frys is not statically linked: \
$(file dist/frys)"
}

ensure_system_tools
ensure_build_venv
freeze
make_static

size=$(stat -c %s dist/frys)
echo "build.sh: dist/frys $(awk -v s="$size" 'BEGIN { printf "%.1f MiB", s / 1048576 }') \
($size bytes), built in $(($(date +%s) - START)) s"
echo "build.sh: $(file -b dist/frys | cut -d, -f1-4)"
