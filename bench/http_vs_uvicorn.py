"""Our HTTP server against uvicorn + starlette, side by side in one run; and idle WebSockets.

Needs the `bench` extra (uvicorn[standard], starlette: `pip install -e '.[bench]'`) and `wrk`
(`apt-get install wrk`). Every server runs in its own process, one event loop, no access
log; wrk runs in another. Our server is the real `frys run`; the uvicorn servers wrap the
same Runtime (started in starlette's lifespan) and answer the same two endpoints with the
same work: GET /health (the health snapshot) and GET /kv/bench/reading (a KV read from
SQLite), JSON-encoded by msgspec. uvicorn runs twice: pure Python (h11 on asyncio, like us)
and its fast default (httptools on uvloop, C extensions).

Then, in a fresh `frys run`, a separate client process opens N WebSockets on /ws, each
subscribed to a topic, and holds them idle; the server's extra RSS is reported.

    python bench/http_vs_uvicorn.py                  # 3 rounds of 10 s wrk runs, 10,000 WebSockets
    python bench/http_vs_uvicorn.py --quick          # 1 round of 3 s runs, 2,000 WebSockets
    python bench/http_vs_uvicorn.py --json bench/results/http.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HEALTH_PATH = "/health"
KV_PATH = "/kv/bench/reading"
SERVERS = ("frys", "uvicorn-h11", "uvicorn-httptools")


# -- the servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE as far as allowed (children inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (1_048_576, 262_144, 65_536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, soft), max(wanted, hard)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def env_for(data: Path, port: int, health_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRYS_")}
    env.update(
        FRYS_SYSTEM_DATA_DIR=str(data),
        FRYS_WORKFLOWS_DIR=str(data / "no-workflows"),
        FRYS_NETWORK_PORT=str(port),
        FRYS_NETWORK_HEALTH_PORT=str(health_port),
        FRYS_NETWORK_MAX_CONNECTIONS="20000",
        FRYS_SYSTEM_LOG_LEVEL="warning",
        FRYS_MEMORY_LIMIT="1GB",
    )
    return env


def seed(data: Path) -> None:
    """The KV entry both servers read."""
    subprocess.run(
        [sys.executable, "-m", "frys_edge.cli", "kv", "put", "--data-dir", str(data), "-n",
         "bench", "reading", '{"sensor": "boiler", "celsius": 71.5, "ok": true}'],
        check=True, capture_output=True, env=env_for(data, 0, 0),
    )  # fmt: skip


def start_server(kind: str, data: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """Start one server process; returns it and the ports of its two endpoints."""
    port, health_port = free_port(), free_port()
    if kind == "frys":
        cmd = [sys.executable, "-m", "frys_edge.cli", "run"]
        ports = {"health": health_port, "kv": port}
    else:
        http = "h11" if kind == "uvicorn-h11" else "httptools"
        loop = "asyncio" if kind == "uvicorn-h11" else "uvloop"
        cmd = [sys.executable, __file__, "serve-uvicorn", str(port), http, loop]
        ports = {"health": port, "kv": port}
    proc = subprocess.Popen(
        cmd, env=env_for(data, port, health_port), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            for name, path in (("health", HEALTH_PATH), ("kv", KV_PATH)):
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[name]}{path}", timeout=1):
                    pass
            return proc, ports
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"{kind} did not start: {err[-2000:]}") from None
            time.sleep(0.1)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_uvicorn(port: int, http: str, loop: str) -> None:
    """The same two endpoints under uvicorn + starlette, over the same Runtime."""
    import contextlib

    import msgspec
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from frys_edge.runtime import Runtime

    rt = Runtime()

    def json_response(status: int, document: Any) -> Response:
        return Response(msgspec.json.encode(document), status, media_type="application/json")

    async def health(request: Request) -> Response:
        return json_response(200, rt.health.snapshot())

    async def kv(request: Request) -> Response:
        assert rt.storage is not None
        namespace, key = request.path_params["namespace"], request.path_params["key"]
        entry = rt.storage.get(namespace, key)
        if entry is None:
            error = {"code": "not_found", "message": f"no key {key!r}", "path": None}
            return json_response(404, {"error": error})
        return json_response(200, msgspec.structs.asdict(entry))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        async with rt:
            yield

    app = Starlette(
        routes=[Route("/health", health), Route("/kv/{namespace}/{key:path}", kv)],
        lifespan=lifespan,
    )
    uvicorn.run(
        app, host="127.0.0.1", port=port, http=http, loop=loop, access_log=False,
        log_level="warning", lifespan="on",
    )  # fmt: skip


# -- wrk ------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert found, text
    return float(found.group(1)) * _UNITS[found.group(2)]


def wrk(url: str, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run (one thread: the other core serves); requests/s and latency percentiles."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    result: dict[str, Any] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        result[f"p{pct}_ms"] = _ms(re.search(rf"\s{pct}%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    result["non_2xx"] = int(errors.group(1)) if errors else 0
    result["socket_errors"] = socket_errors.group(1) if socket_errors else ""
    return result


def bench_http(
    data: Path, seconds: float, connections: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Each server in each round, in a rotating order, and the median of each figure over
    the rounds, so a burst of load from elsewhere on the machine hits every server alike."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        for kind in SERVERS[r % len(SERVERS) :] + SERVERS[: r % len(SERVERS)]:
            proc, ports = start_server(kind, data)
            try:
                for name, path in (("health", HEALTH_PATH), ("kv", KV_PATH)):
                    url = f"http://127.0.0.1:{ports[name]}{path}"
                    wrk(url, connections, 1.0)  # warm-up
                    loaded = wrk(url, connections, seconds)
                    single = wrk(url, 1, min(seconds, 3.0))
                    loaded["p99_ms_1conn"] = single["p99_ms"]
                    loaded["p50_ms_1conn"] = single["p50_ms"]
                    runs.setdefault(f"{kind} {name}", []).append(loaded)
                    print(f"  round {r + 1} {kind:18} {name:6} {loaded['rps']:9.0f} req/s  "
                          f"p99 {loaded['p99_ms']:.2f} ms (1 conn: {single['p99_ms']:.2f} ms)",
                          flush=True)  # fmt: skip
            finally:
                stop_server(proc)
    results: dict[str, dict[str, Any]] = {}
    for key, found in runs.items():  # each figure's median over the rounds, on its own
        results[key] = {
            name: statistics.median(run[name] for run in found)
            for name in ("rps", "p50_ms", "p90_ms", "p99_ms", "p99_ms_1conn", "p50_ms_1conn")
        }
        results[key]["rounds_rps"] = [round(run["rps"]) for run in found]
        results[key]["non_2xx"] = sum(run["non_2xx"] for run in found)
    return results


# -- idle WebSockets ------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _hold_websockets(port: int, count: int) -> None:
    """Client side (own process): open `count` /ws connections, subscribe each, hold them."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage

    held: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200)

    async def one(i: int) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            ws = WSConnection(ConnectionType.CLIENT)
            writer.write(ws.send(Request(host=f"127.0.0.1:{port}", target="/ws")))
            subscribed = False
            while not subscribed:
                data = await reader.read(4096)
                if not data:
                    raise ConnectionError("closed during the handshake")
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        message = {"op": "subscribe", "topics": [f"idle/{i}"]}
                        writer.write(ws.send(TextMessage(json.dumps(message))))
                    elif isinstance(event, TextMessage) and '"subscribed"' in event.data:
                        subscribed = True
            held.append(writer)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    print(f"READY {len(held)} {time.perf_counter() - started:.2f}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until told
    for writer in held:
        writer.close()


def bench_websockets(data: Path, count: int) -> dict[str, Any]:
    proc, ports = start_server("frys", data)
    try:
        time.sleep(1.0)
        before = rss_kib(proc.pid)
        clients = subprocess.Popen(
            [sys.executable, __file__, "hold-websockets", str(ports["kv"]), str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert clients.stdout is not None and clients.stdin is not None
        line = clients.stdout.readline().split()
        if not line or line[0] != "READY":
            raise SystemExit(f"the WebSocket clients failed: {line}")
        held, seconds = int(line[1]), float(line[2])
        time.sleep(2.0)  # idle: pings are 20 s apart; let the allocator settle
        after = rss_kib(proc.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['health']}/metrics") as r:
            metrics = r.read().decode()
        gauge = re.search(r"^frys_ws_connections (\d+)", metrics, re.M)
        clients.stdin.close()
        clients.wait(timeout=60)
    finally:
        stop_server(proc)
    extra = (after - before) / 1024
    return {
        "connections": held,
        "server_counted": int(gauge.group(1)) if gauge else None,
        "connect_seconds": seconds,
        "rss_before_mib": before / 1024,
        "rss_after_mib": after / 1024,
        "extra_rss_mib": extra,
        "kib_per_connection": (after - before) / max(held, 1),
    }


# -- the report -----------------------------------------------------------------------------


def report(http: dict[str, dict[str, Any]], ws: dict[str, Any] | None) -> dict[str, Any]:
    rows = []
    for endpoint in ("health", "kv"):
        ours = http[f"frys {endpoint}"]
        for other in SERVERS[1:]:
            theirs = http[f"{other} {endpoint}"]
            rows.append({
                "endpoint": endpoint,
                "against": other,
                "ours_rps": round(ours["rps"]),
                "theirs_rps": round(theirs["rps"]),
                "ratio": round(ours["rps"] / theirs["rps"], 2),
                "ours_p99_ms": ours["p99_ms"],
                "theirs_p99_ms": theirs["p99_ms"],
                "ours_p99_ms_1conn": ours["p99_ms_1conn"],
            })  # fmt: skip
    print()
    print("| endpoint | against | ours req/s | theirs req/s | ours/theirs (≥ 0.8) | ours p99 "
          "@64 (< 5 ms) | theirs p99 @64 | ours p99 @1 conn |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['endpoint']} | {r['against']} | {r['ours_rps']} | {r['theirs_rps']} | "
              f"{r['ratio']:.2f} | {r['ours_p99_ms']:.2f} ms | {r['theirs_p99_ms']:.2f} ms | "
              f"{r['ours_p99_ms_1conn']:.2f} ms |")  # fmt: skip
    if ws is not None:
        print()
        print(f"idle WebSockets: {ws['connections']} held (server counts {ws['server_counted']}),"
              f" opened in {ws['connect_seconds']:.1f} s; server RSS {ws['rss_before_mib']:.1f}"
              f" -> {ws['rss_after_mib']:.1f} MiB: {ws['extra_rss_mib']:.1f} MiB extra "
              f"(target < 200 MiB), {ws['kib_per_connection']:.1f} KiB each")  # fmt: skip
    return {"http": rows, "raw": http, "websockets": ws}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each loaded wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many rounds")
    parser.add_argument("--websockets", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="3 s runs, 2,000 WebSockets")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    if args.quick:
        args.seconds, args.rounds = 3.0, 1
        args.websockets = min(args.websockets, 2_000)
    limit = raise_fd_limit()
    print(f"fd limit {limit}; {os.cpu_count()} cores; wrk -t1 -c{args.connections}", flush=True)
    with tempfile.TemporaryDirectory(prefix="frys-bench-http-") as tmp:
        data = Path(tmp) / "data"
        seed(data)
        http = bench_http(data, args.seconds, args.connections, args.rounds)
        ws = bench_websockets(data, args.websockets) if args.websockets else None
    document = report(http, ws)
    document["settings"] = {
        "seconds": args.seconds, "connections": args.connections, "rounds": args.rounds,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document["http"]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve-uvicorn":
        serve_uvicorn(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "hold-websockets":
        asyncio.run(_hold_websockets(int(sys.argv[2]), int(sys.argv[3])))
    else:
        main()
