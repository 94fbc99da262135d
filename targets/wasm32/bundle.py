"""bundle.py: the two steps of targets/wasm32/build.sh that are easier in Python than in bash.

bundle.py pure-wheel SDIST OUT_DIR   PyYAML's sdist -> a py3-none-any wheel of its pure-Python
                                     package (no libyaml; PyPI has no such wheel)
bundle.py manifest BUNDLE_DIR        write BUNDLE_DIR/manifest.json: what the loader installs
                                     and every file with its size and sha256
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

# PyYAML keeps its Python 3 package under lib/yaml in the sdist.
YAML_PACKAGE = PurePosixPath("lib/yaml")


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def pure_wheel(sdist: Path, out_dir: Path) -> Path:
    """Build a pure-Python wheel of PyYAML from its sdist; returns the wheel's path."""
    files: dict[str, bytes] = {}
    pkg_info = None
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            inner = PurePosixPath(*path.parts[1:])
            extracted = tar.extractfile(member) if member.isfile() else None
            if extracted is None:
                continue
            if inner == PurePosixPath("PKG-INFO"):
                pkg_info = extracted.read().decode()
            elif inner.parent == YAML_PACKAGE and inner.suffix == ".py":
                files[f"yaml/{inner.name}"] = extracted.read()
    if pkg_info is None or "yaml/__init__.py" not in files:
        sys.exit(f"bundle.py: {sdist} does not look like PyYAML's sdist (no PKG-INFO or lib/yaml)")
    meta = Parser().parsestr(pkg_info)
    name, version = meta["Name"], meta["Version"]
    dist_info = f"{name}-{version}.dist-info"
    files[f"{dist_info}/METADATA"] = pkg_info.encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: frys-edge targets/wasm32/bundle.py\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/top_level.txt"] = b"yaml\n"
    record = "".join(f"{arc},{_record_hash(data)},{len(data)}\n" for arc, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc, data in sorted(files.items()):
            zf.writestr(arc, data)
    print(f"  {wheel} ({len(files)} files, pure Python)", file=sys.stderr)
    return wheel


def manifest(bundle: Path) -> dict[str, object]:
    """Describe the bundle: versions, wheels, app files, and every file's size and hash."""
    files = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel == "manifest.json":
            continue
        data = path.read_bytes()
        files[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    sizes: dict[str, int] = {}
    for rel, info in files.items():
        top = rel.split("/")[0] if "/" in rel else "loader"
        sizes[top] = sizes.get(top, 0) + int(info["size"])  # type: ignore[call-overload]
    lock = json.loads((bundle / "pyodide" / "pyodide-lock.json").read_text())["info"]
    result: dict[str, object] = {
        "pyodide": {"python": lock["python"], "abi": lock["abi_version"]},
        "wheels": sorted(rel.removeprefix("wheels/") for rel in files if rel.startswith("wheels/")),
        "app": sorted(rel.removeprefix("app/") for rel in files if rel.startswith("app/")),
        "total_bytes": sum(sizes.values()),
        "bytes_by_part": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "files": files,
    }
    (bundle / "manifest.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "pure-wheel":
        pure_wheel(Path(argv[1]), Path(argv[2]))
    elif len(argv) == 2 and argv[0] == "manifest":
        manifest(Path(argv[1]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
