"""A stand-in for the server a gateway forwards to: prints each batch it receives.

Run it beside the gateway: `python3 examples/gateway/collector.py [PORT]` (default 8099).
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Collector(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        print(f"received {len(batch)} readings, last: {batch[-1] if batch else None}", flush=True)
        reply = json.dumps({"stored": len(batch)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8099
    print(f"collector listening on http://127.0.0.1:{port}/ingest", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Collector).serve_forever()
