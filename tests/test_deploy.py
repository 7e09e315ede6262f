"""The container recipe: what the image runs is a command the CLI takes, configured by the
environment the deployment docs name. (Building and running the image: deploy/check_replicas.py.)"""

import json
import re
from pathlib import Path

from malaria_cells.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _instruction(name: str) -> str:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]
    assert len(found) == 1, f"one {name} expected in the Dockerfile"
    return found[0]


def test_the_image_serves_on_all_addresses_with_the_key_and_database_from_the_environment(monkeypatch, tmp_path):
    import uvicorn

    assert json.loads(_instruction("ENTRYPOINT")) == ["malaria-cells"]
    command = json.loads(_instruction("CMD"))
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append((app, options)))
    monkeypatch.setenv("MALARIA_CELLS_API_KEY", "k")
    monkeypatch.setenv("MALARIA_CELLS_DB", f"sqlite:///{tmp_path / 'lab.db'}")
    assert main(command) == 0
    app, options = started[0]
    assert options["host"] == "0.0.0.0" and str(options["port"]) in _instruction("EXPOSE").split()
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        probe = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", _instruction("HEALTHCHECK"))
        assert probe and probe.group(1) == str(options["port"])
        assert client.get(probe.group(2)).status_code == 200  # no key needed for the probe
        assert client.get("/v1/records").status_code == 401  # everything else needs it
        assert client.get("/v1/records", headers={"X-API-Key": "k"}).json() == {"samples": []}
    assert (tmp_path / "lab.db").is_file()  # the records database the environment named


def test_the_image_will_not_serve_openly_without_a_key(monkeypatch, capsys):
    monkeypatch.delenv("MALARIA_CELLS_API_KEY", raising=False)
    assert main(json.loads(_instruction("CMD"))) == 2
    assert "no API key is set" in capsys.readouterr().err


def test_the_build_context_holds_what_the_dockerfile_copies():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:ignore.index("*") + 4] == ["!pyproject.toml", "!README.md", "!src/"]
    copied = [part for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")
              for part in line.split()[1:-1]]
    assert copied and all((ROOT / part).exists() for part in copied)
    assert all(part in ("pyproject.toml", "README.md", "src") for part in copied)


def test_the_image_does_not_run_as_root():
    assert _instruction("USER") not in ("0", "root", "0:0")
