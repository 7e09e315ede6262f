"""Run the image as several ``serve`` replicas against one PostgreSQL, and check what a
deployment relies on.

    python deploy/check_replicas.py --db postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB
                                    [--image malaria-cells] [--engine docker|podman] [--replicas 2]

The replicas run with the host's network (ports 8101, 8102, ...), so the database URL is the
one the host uses. The check, each step printed:

1. every replica starts, as a non-root user, and answers ``/healthz`` and ``/readyz``;
2. without the API key a screen is refused (401);
3. the shipped example fields are screened on every replica at once, each request with a patient
   identifier, and each answer carries its ``record_id``;
4. every replica lists every record (``GET /v1/records``): one database, not one each;
5. the replicas' access logs are one JSON object a line, and hold neither the patient
   identifier nor a file name.

Exits 1 at the first failure, with what failed; the containers are removed in any case.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "malaria_cells" / "examples" / "fields"


def request(url: str, *, key: str | None = None, body: bytes | None = None, content_type: str | None = None,
            timeout: float = 120.0) -> tuple[int, bytes]:
    headers = {"X-API-Key": key} if key else {}
    if content_type:
        headers["Content-Type"] = content_type
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def multipart(paths: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for path in paths:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def fail(message: str) -> None:
    raise SystemExit(f"FAILED: {message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="malaria-cells")
    parser.add_argument("--engine", default="docker", help="docker or podman (default: %(default)s)")
    parser.add_argument("--db", default=os.environ.get("MALARIA_CELLS_TEST_POSTGRES"),
                        help="the shared PostgreSQL's URL (default: $MALARIA_CELLS_TEST_POSTGRES)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--first-port", type=int, default=8101)
    args = parser.parse_args()
    if not args.db:
        fail("no --db (a PostgreSQL URL the replicas share)")
    key, patient = secrets.token_urlsafe(16), f"PATIENT-{secrets.token_hex(4)}"
    names = [f"malaria-cells-check-{os.getpid()}-{k}" for k in range(args.replicas)]
    ports = [args.first_port + k for k in range(args.replicas)]
    fields = sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    started = time.perf_counter()
    try:
        for name, port in zip(names, ports):
            subprocess.run([args.engine, "run", "-d", "--name", name, "--network", "host",
                            "-e", f"MALARIA_CELLS_API_KEY={key}", "-e", f"MALARIA_CELLS_DB={args.db}",
                            args.image, "serve", "--host", "0.0.0.0", "--port", str(port)],
                           check=True, stdout=subprocess.DEVNULL)
        for name, port in zip(names, ports):
            deadline = time.monotonic() + 180
            while not _up(port):
                if time.monotonic() > deadline:
                    fail(f"{name} did not answer /healthz in 180 s:\n{_logs(args.engine, name)[-2000:]}")
                time.sleep(1)
            status, _ = request(f"http://127.0.0.1:{port}/readyz", timeout=5)
            user = subprocess.run([args.engine, "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
            if status != 200 or user in ("", "0"):
                fail(f"{name}: /readyz {status}, user id {user!r}")
            print(f"1. {name} up in {time.perf_counter() - started:.0f} s: /healthz and /readyz 200, user id {user}")
        body, content_type = multipart(fields)
        status, _ = request(f"http://127.0.0.1:{ports[0]}/v1/screen", body=body, content_type=content_type)
        if status != 401:
            fail(f"a screen without the API key answered {status}, not 401")
        print("2. a screen without the API key: 401")

        def screen(port):
            return request(f"http://127.0.0.1:{port}/v1/screen?patient={patient}", key=key, body=body,
                           content_type=content_type, timeout=300)

        with concurrent.futures.ThreadPoolExecutor(len(ports)) as pool:
            answers = list(pool.map(screen, ports))
        ids = []
        for port, (status, data) in zip(ports, answers):
            if status != 200:
                fail(f"screen on port {port}: {status} {data[:300]!r}")
            answer = json.loads(data)
            ids.append(answer.get("record_id"))
            print(f"3. port {port}: {answer['summary']['call']}, {answer['summary']['n_cells']} cells, "
                  f"record {answer.get('record_id')}")
        if None in ids or len(set(ids)) != len(ids):
            fail(f"record ids {ids}")
        for port in ports:
            status, data = request(f"http://127.0.0.1:{port}/v1/records?limit=200", key=key)
            listed = {item["id"] for item in json.loads(data)["samples"]} if status == 200 else set()
            if not set(ids) <= listed:
                fail(f"port {port} lists {sorted(listed)[-5:]} (status {status}), not all of {ids}")
        print(f"4. every replica lists records {ids}")
    finally:
        logs = {name: _logs(args.engine, name) for name in names}
        subprocess.run([args.engine, "rm", "-f", *names], capture_output=True)
    for name, text in logs.items():
        lines = [line for line in text.splitlines() if line.startswith("{")]
        entries = [json.loads(line) for line in lines]
        if not any(e.get("path") == "/v1/screen" for e in entries):
            fail(f"{name}: no access-log line for /v1/screen in:\n{text[-1500:]}")
        leaked = [line for line in lines if patient in line or any(f.name in line for f in fields)]
        if leaked:
            fail(f"{name}: the access log holds patient data or a file name: {leaked[0]}")
        print(f"5. {name}: {len(entries)} access-log lines, JSON, e.g. {lines[-1]}; no patient id, no file name")
    print(f"all checks passed in {time.perf_counter() - started:.0f} s")
    return 0


def _up(port: int) -> bool:
    try:
        return request(f"http://127.0.0.1:{port}/healthz", timeout=5)[0] == 200
    except OSError:
        return False


def _logs(engine: str, name: str) -> str:
    done = subprocess.run([engine, "logs", name], capture_output=True, text=True)
    return done.stdout + done.stderr


if __name__ == "__main__":
    sys.exit(main())
