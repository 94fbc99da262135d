"""PyInstaller runtime hook of dist/frys: unpack wasmtime's native library on first import.

A onefile binary unpacks every collected file at each start; `_libwasmtime.so` is 24 MB of
the 44 MB, and inflating it would double the start of every command, `frys --version`
included. So build.sh stores it zlib-compressed inside a module of the PYZ archive (read in
place, never unpacked at start), and this hook writes it where wasmtime looks for it the
first time `wasmtime` is imported (`frys run` with WASM plugins, `frys plugin ...`).
"""

import base64
import contextlib
import hashlib
import importlib
import os
import sys
import zlib


def _unpack_libwasmtime() -> None:
    blob = importlib.import_module("_frys_libwasmtime")
    del sys.modules["_frys_libwasmtime"]  # its 12 MB of text go once this returns
    target = os.path.join(
        sys._MEIPASS,  # type: ignore[attr-defined]  # set by PyInstaller's bootloader
        "wasmtime",
        blob.PLATFORM_DIR,
        "_libwasmtime.so",
    )
    if os.path.exists(target):
        return
    partial = f"{target}.{os.getpid()}.part"
    # In 1 MiB pieces: a 24 MB bytes object would stay in the heap as resident memory.
    inflate, digest, step = zlib.decompressobj(), hashlib.sha256(), 4 << 18
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(partial, "wb") as f:
            for start in range(0, len(blob.DATA), step):
                piece = inflate.decompress(base64.b64decode(blob.DATA[start : start + step]))
                digest.update(piece)
                f.write(piece)
            piece = inflate.flush()
            digest.update(piece)
            f.write(piece)
        if digest.hexdigest() != blob.SHA256:
            os.unlink(partial)
            raise ImportError("frys: the bundled _libwasmtime.so is damaged; rebuild dist/frys")
        os.replace(partial, target)
    except OSError as e:
        raise ImportError(
            f"frys: cannot unpack _libwasmtime.so to {target} ({e}); TMPDIR must be writable "
            "with about 25 MB free"
        ) from e


def _keep_large_buffers_out_of_the_heap() -> None:
    """Fix glibc's mmap threshold at its default 128 KiB before the archive's 10 MB reads.

    Left dynamic, freeing those buffers raises the threshold, later allocations come from
    the heap, and about 11 MB more stays resident for the life of the process.
    """
    import ctypes

    m_mmap_threshold = -3
    with contextlib.suppress(OSError, AttributeError):  # not glibc: no such threshold
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 128 * 1024)


class _UnpackWasmtimeFirst:
    """A meta path finder that only unpacks the library, then lets the usual finders import."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name == "wasmtime":
            sys.meta_path.remove(_UnpackWasmtimeFirst)
            _keep_large_buffers_out_of_the_heap()
            _unpack_libwasmtime()


sys.meta_path.insert(0, _UnpackWasmtimeFirst)
