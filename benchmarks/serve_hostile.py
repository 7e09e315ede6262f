"""Hostile uploads against a running server: time, memory and health under load.

    python benchmarks/serve_hostile.py [--port 8765] [--only NAME ...]

Starts ``malaria-cells serve`` (default settings, the shipped models) in a child process,
builds every input itself, and for each attack sends it (alone and four at once) to
``POST /v1/screen`` while it polls ``GET /healthz`` and ``GET /readyz`` every 50 ms and
samples the server's resident memory every 20 ms. Prints one row per attack: answer statuses,
wall time, the server's peak and settled memory, and the slowest health answer.

Inputs (all made here, none from ../shared):

- ``flat_png``: a flat grey 1024x1024 PNG (4.5 KB), eight in one request;
- ``flood``: 45 requests at once, each one such PNG;
- ``noise_16mp``: a 4608x3456 JPEG of uniform noise (about 14 MB), four requests at once;
- ``png16_40mp``: a 7744x5164 16-bit RGBA PNG of a smooth gradient (a few hundred KB), four
  requests at once;
- ``progressive_scans``: a flat 1024x1024 progressive JPEG with its last scan repeated 10,000
  times (127 KB);
- ``app_segments``: a JPEG with 1,000 APP1 segments of 60 KB;
- ``tiny_mixed``: 8 good fields of the package's examples and one 3x3 PNG in one request.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _png(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", image[..., ::-1] if image.ndim == 3 and image.shape[2] == 3 else image)
    return data.tobytes()


def _jpeg(image: np.ndarray, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def flat_png():
    return [("flat.png", _png(np.full((1024, 1024, 3), 200, np.uint8)))] * 8


def flood():
    return [("flat.png", _png(np.full((1024, 1024, 3), 200, np.uint8)))]


def noise_16mp():
    rng = np.random.default_rng(0)
    return [("noise.jpg", _jpeg(rng.integers(0, 256, (3456, 4608, 3), np.uint8), quality=90))]


def png16_40mp():
    height, width = 5164, 7744
    ramp = np.linspace(0, 65535, width, dtype=np.float32).astype(np.uint16)
    image = np.empty((height, width, 4), np.uint16)
    image[..., :3] = ramp[None, :, None]
    image[..., 3] = 65535
    import cv2

    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return [("big16.png", data.tobytes())]


def progressive_scans():
    base = _jpeg(np.full((1024, 1024, 3), 128, np.uint8), progressive=True)
    last_scan = base.rfind(b"\xff\xda")
    scan = base[last_scan:-2]  # the last scan (a refinement one) with its data
    return [("scans.jpg", base[:-2] + scan * 10_000 + b"\xff\xd9")]


def app_segments():
    rng = np.random.default_rng(2)
    base = _jpeg(rng.integers(0, 256, (256, 256, 3), np.uint8))
    payload = b"Exif\x00\x00" + bytes(60_000)
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return [("app1.jpg", base[:2] + segment * 1000 + base[2:])]


def tiny_mixed():
    examples = Path(__file__).resolve().parents[1] / "src" / "malaria_cells" / "examples" / "fields"
    good = [(p.name, p.read_bytes()) for p in sorted(examples.iterdir()) if p.suffix.lower() in (".jpg", ".png")]
    return (good * 4)[:8] + [("tiny.png", _png(np.full((3, 3, 3), 128, np.uint8)))]


ATTACKS = {"flat_png": (flat_png, 1), "flood": (flood, 45), "noise_16mp": (noise_16mp, 4), "png16_40mp": (png16_40mp, 4),
           "progressive_scans": (progressive_scans, 1), "app_segments": (app_segments, 1),
           "tiny_mixed": (tiny_mixed, 1)}


def _rss(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    total = 0
    for p in [pid] + _children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--only", nargs="*", choices=sorted(ATTACKS), help="run only these attacks")
    parser.add_argument("--serve-args", default="", help="extra arguments for `malaria-cells serve`")
    args = parser.parse_args(argv)
    import httpx

    command = [sys.executable, "-m", "malaria_cells", "serve", "--port", str(args.port)] + args.serve_args.split()
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL)  # its access log is not read here
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        time.sleep(1.0)
        idle = _rss(server.pid)
        print(f"server idle: {idle:.0f} MiB ({' '.join(command[2:])})", flush=True)
        print("| attack | requests | statuses | seconds | peak MiB | settled MiB | slowest /healthz ms | "
              "slowest /readyz ms |")
        print("|---|---|---|---|---|---|---|---|")
        for name in args.only or ATTACKS:
            make, copies = ATTACKS[name]
            files = make()
            peak, stop, health = [idle], threading.Event(), {"/healthz": [], "/readyz": []}

            def sample():
                while not stop.is_set():
                    peak.append(_rss(server.pid))
                    time.sleep(0.02)

            def poll():
                with httpx.Client(timeout=30) as client:
                    while not stop.is_set():
                        for path in health:
                            started = time.perf_counter()
                            try:
                                client.get(base + path)
                            except httpx.HTTPError:
                                pass
                            health[path].append(time.perf_counter() - started)
                        time.sleep(0.05)

            statuses = []

            def send():
                upload = [("files", (n, data, "application/octet-stream")) for n, data in files]
                try:
                    statuses.append(httpx.post(base + "/v1/screen", files=upload, timeout=900).status_code)
                except httpx.HTTPError as error:
                    statuses.append(type(error).__name__)

            watchers = [threading.Thread(target=sample), threading.Thread(target=poll)]
            for w in watchers:
                w.start()
            started = time.perf_counter()
            senders = [threading.Thread(target=send) for _ in range(copies)]
            for s in senders:
                s.start()
            for s in senders:
                s.join()
            seconds = time.perf_counter() - started
            stop.set()
            for w in watchers:
                w.join()
            time.sleep(2.0)
            settled = _rss(server.pid)
            slowest = {p: 1000 * max(v) if v else float("nan") for p, v in health.items()}
            print(f"| {name} | {copies} | {', '.join(map(str, sorted(statuses, key=str)))} | {seconds:.1f} | "
                  f"{max(peak):.0f} | {settled:.0f} | {slowest['/healthz']:.0f} | {slowest['/readyz']:.0f} |",
                  flush=True)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
