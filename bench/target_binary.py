"""Measure dist/frys against the wheel install: size, `--version` start, idle RSS, /tmp use.

Run as root from the repository root, after `bash build.sh binary`:

    .venv/bin/python bench/target_binary.py [--runs 10] [--json bench/results/binary.json]

The binary runs in an empty chroot (the binary alone, /tmp, /data, /proc mounted) as user
65532, as in the FROM scratch image; the wheel install is `.venv/bin/frys` on the host. RSS is
VmRSS after the runtime has been idle for --idle seconds, for the Python process and (binary)
for the sum of its three processes (staticx loader, PyInstaller loader, Python).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "dist" / "frys"
WHEEL = ROOT / ".venv" / "bin" / "frys"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
ENV = {"FRYS_NETWORK_PORT": "0", "FRYS_NETWORK_HEALTH_PORT": "0"}


@contextmanager
def empty_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # the user must be able to enter it
        shutil.copy2(BINARY, root / "frys")
        (root / "tmp").mkdir(mode=0o1777)
        (root / "tmp").chmod(0o1777)
        (root / "data").mkdir()
        os.chown(root / "data", 65532, 65532)
        (root / "proc").mkdir()
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        try:
            yield root
        finally:
            subprocess.run(["umount", "-l", str(root / "proc")], check=True)


def gateway_files(dest: Path) -> None:
    gateway = dest / "examples" / "gateway"
    gateway.mkdir(parents=True)
    for name in ("frys.toml", "sensors.py"):
        shutil.copy2(ROOT / "examples" / "gateway" / name, gateway / name)
    shutil.copytree(ROOT / "examples" / "gateway" / "workflows", gateway / "workflows")
    shutil.copytree(ROOT / "plugins" / "anomaly", dest / "plugins" / "anomaly")


def median_ms(argv: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children] + [d for c in children for d in descendants(int(c))]


def du_kib(path: Path) -> int:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def idle_rss(argv: list[str], cwd: Path, idle: float, tmp: Path | None) -> dict[str, float]:
    """RSS (MiB) of the last process of the tree and of the whole tree after `idle` s."""
    proc = subprocess.Popen(argv, cwd=cwd, env=ENV, stderr=subprocess.DEVNULL)
    try:
        time.sleep(idle)
        assert proc.poll() is None, f"{argv} exited with {proc.returncode}"
        tree = [proc.pid, *descendants(proc.pid)]
        result = {
            "python_mib": rss_kib(tree[-1]) / 1024,
            "all_processes_mib": sum(rss_kib(p) for p in tree) / 1024,
        }
        if tmp is not None:
            result["tmpdir_mib"] = du_kib(tmp) / 1024
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="--version runs (median)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds idle before RSS")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/target_binary.py: needs root (chroot, mount)")
    if not BINARY.exists() or not WHEEL.exists():
        raise SystemExit("bench/target_binary.py: needs dist/frys and .venv/bin/frys")

    results: dict[str, float] = {"binary_size_mib": BINARY.stat().st_size / 2**20}
    user = ["--userspec=65532:65532"]
    with empty_root() as root:
        in_root = [CHROOT, *user, str(root), "/frys"]
        results["version_binary_chroot_ms"] = median_ms([*in_root, "--version"], args.runs, {})
        results["version_wheel_ms"] = median_ms([str(WHEEL), "--version"], args.runs, ENV)
        for name, run_args in (
            ("minimal", ["run", "--data-dir", "/data"]),
            ("gateway", ["run", "-c", "examples/gateway/frys.toml", "--data-dir", "/data/gw"]),
        ):
            if name == "gateway":
                gateway_files(root)
            binary = idle_rss([*in_root, *run_args], root, args.idle, root / "tmp")
            with tempfile.TemporaryDirectory() as host_dir:
                host = Path(host_dir)
                gateway_files(host)
                wheel_args = [a.replace("/data", str(host / "data")) for a in run_args]
                wheel = idle_rss([str(WHEEL), *wheel_args], host, args.idle, None)
            results[f"rss_{name}_binary_python_mib"] = binary["python_mib"]
            results[f"rss_{name}_binary_all_processes_mib"] = binary["all_processes_mib"]
            results[f"tmpdir_{name}_binary_mib"] = binary["tmpdir_mib"]
            results[f"rss_{name}_wheel_mib"] = wheel["python_mib"]

    rows = [
        ("dist/frys size", f"{results['binary_size_mib']:.1f} MiB", "", "<= 30 MiB"),
        (
            "--version, median",
            f"{results['version_binary_chroot_ms']:.0f} ms",
            f"{results['version_wheel_ms']:.0f} ms",
            "<= 300 ms",
        ),
    ]
    for name in ("minimal", "gateway"):
        rows.append(
            (
                f"`frys run` {name}, idle RSS",
                f"{results[f'rss_{name}_binary_python_mib']:.1f} MiB "
                f"({results[f'rss_{name}_binary_all_processes_mib']:.1f} with loaders)",
                f"{results[f'rss_{name}_wheel_mib']:.1f} MiB",
                "<= 50 MiB" if name == "minimal" else "",
            )
        )
        tmp_use = f"{results[f'tmpdir_{name}_binary_mib']:.0f} MiB"
        rows.append((f"`frys run` {name}, TMPDIR use", tmp_use, "", ""))
    print(f"| what | dist/frys in chroot | wheel (.venv/bin/frys) | target |\n|{'---|' * 4}")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
