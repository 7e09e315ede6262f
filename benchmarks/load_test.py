"""Bounded load test of ``malaria-cells serve`` on loopback.

    python benchmarks/load_test.py [--model PATH] [--clients 8] [--requests 2000] [--batch 1]
    python benchmarks/load_test.py --batch 64 --requests 200

Starts the real server on 127.0.0.1 (a free port), sends a fixed number of POST
/v1/predict requests from concurrent clients (each request carries --batch real or
synthetic cell PNGs), then stops it. Reports requests/s, images/s, p50/p99 latency and
errors, and (Linux) the CPU time per image of the server and of the client, which share the
cores. Traffic never leaves this machine.
"""

from __future__ import annotations

import asyncio
import glob
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import benchmark_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_pngs(data: str | None, count: int) -> list[bytes]:
    paths = sorted(glob.glob(os.path.join(data, "*", "*.png")))[:count] if data and os.path.isdir(data) else []
    if paths:
        return [Path(p).read_bytes() for p in paths]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process and its running children, such as uvicorn's
    worker processes (Linux /proc; None elsewhere)."""
    if not Path(f"/proc/{pid}/stat").is_file():
        return None
    parents, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        process = int(stat.parent.name)
        parents[process], ticks[process] = int(fields[1]), int(fields[11]) + int(fields[12])

    def in_tree(process: int) -> bool:
        while process not in (pid, 0, 1) and process in parents:
            process = parents[process]
        return process == pid

    return sum(t for process, t in ticks.items() if in_tree(process)) / os.sysconf("SC_CLK_TCK")


BODIES = 32
"""Distinct request bodies, encoded before the clock starts (as wrk or hey send a fixed
body): the load generator shares the cores with the server, so it should take little."""


def encode_request(url: str, images: list[bytes], index: int, batch: int) -> tuple[bytes, dict]:
    """The multipart body and headers of request ``index``: ``batch`` images from the pool."""
    import httpx

    files = [("files", (f"{index}_{j}.png", images[(index * batch + j) % len(images)], "image/png"))
             for j in range(batch)]
    request = httpx.Request("POST", url, files=files)
    return request.read(), {"content-type": request.headers["content-type"]}


async def hammer(url: str, images: list[bytes], clients: int, requests: int, batch: int):
    import httpx

    latencies, errors = [], 0
    counter = iter(range(requests))
    bodies = [encode_request(url, images, i, batch) for i in range(min(requests, BODIES))]

    async def client(http: httpx.AsyncClient):
        nonlocal errors
        for i in counter:
            content, headers = bodies[i % len(bodies)]
            started = time.perf_counter()
            try:
                response = await http.post(url, content=content, headers=headers)
                ok = response.status_code == 200 and len(response.json()["results"]) == batch
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - started, np.array(latencies), errors


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="server processes (serve --workers)")
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "malaria_cells", "serve", "--port", str(port), "--workers", str(args.workers)]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        for _ in range(240):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        images = sample_pngs(args.data, 512)
        url = f"http://127.0.0.1:{port}/v1/predict"
        asyncio.run(hammer(url, images, args.clients, args.warmup, args.batch))
        server_cpu, client_cpu = cpu_seconds(server.pid), sum(os.times()[:2])
        seconds, latencies, errors = asyncio.run(hammer(url, images, args.clients, args.requests, args.batch))
        if server_cpu is not None:
            server_cpu = cpu_seconds(server.pid) - server_cpu
        client_cpu = sum(os.times()[:2]) - client_cpu
    finally:
        server.terminate()
        server.wait(10)
    print(f"{args.requests} requests x {args.batch} images, {args.clients} clients, {os.cpu_count()} CPUs: "
          f"{args.requests / seconds:.0f} requests/s, {args.requests * args.batch / seconds:.0f} images/s, "
          f"p50 {1000 * np.percentile(latencies, 50):.1f} ms, p99 {1000 * np.percentile(latencies, 99):.1f} ms, "
          f"errors {errors}")
    n_images = args.requests * args.batch
    if server_cpu is not None:  # the clients share the cores: how the CPU time divided
        print(f"CPU per image: server {1e6 * server_cpu / n_images:.0f} us, load-test client "
              f"{1e6 * client_cpu / n_images:.0f} us")


if __name__ == "__main__":
    main()
