"""Docker packaging, checked without a Docker engine: the compose file against the Compose
Specification, the Dockerfile's structure, and its install step run for real in a fresh venv."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_validator():
    schema = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)  # the draft its $schema names


def test_compose_file_follows_the_compose_specification():
    errors = sorted(compose_validator().iter_errors(compose()), key=str)
    assert not errors, "\n".join(e.message for e in errors)


def test_the_validator_rejects_a_broken_compose_file():
    broken = compose()
    broken["services"]["web"]["depends_on"]["migrate"]["condition"] = "whenever"
    broken["services"]["db"]["healthcheck"]["retries"] = "many"
    assert len(list(compose_validator().iter_errors(broken))) >= 2


def test_compose_runs_db_migration_gpu_worker_and_web_in_order():
    services = compose()["services"]
    assert set(services) == {"db", "migrate", "worker", "web"}
    assert services["db"]["image"].startswith("postgres:15") and "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    assert "pgdata:/var/lib/postgresql/data" in services["db"]["volumes"]
    assert services["migrate"]["command"] == ["clipscope", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    for name in ("worker", "web"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["CLIPSCOPE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "clipscope-data:/data" in services[name]["volumes"]
    assert services["worker"]["command"] == ["clipscope", "run", "configs/seed.toml"]
    device = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["web"]["ports"] == ["8000:8000"] and services["web"]["command"][:2] == ["clipscope", "serve"]
    assert (ROOT / services["worker"]["command"][2]).is_file()



def test_the_gpu_worker_has_shared_memory_for_its_decoding_workers():
    """DataLoader workers hand each batch over through /dev/shm, whose Docker default (64 MB) holds not
    one batch of the seed recipe's extraction: up to 16 workers, two batches each in flight."""
    from clipscope.config import load_config

    batch_bytes = load_config(ROOT / "configs" / "seed.toml").extract.batch_size * 3 * 224 * 224 * 4
    size = re.fullmatch(r"(\d+)([kmg])b?", str(compose()["services"]["worker"]["shm_size"]).lower())
    assert size, "shm_size must be set on the GPU worker"
    assert int(size[1]) * 1024 ** "kmg".index(size[2]) * 1024 >= 16 * 2 * batch_bytes

def test_dockerfile_copies_what_exists_runs_as_non_root_with_healthcheck_and_volume():
    text = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY source {path} is missing"
    assert re.search(r"^USER clipscope$", text, flags=re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'VOLUME ["/data"]' in text and "CLIPSCOPE_DATA_DIR=/data" in text
    assert "scripts/install-app.sh /app" in text
    # everything the code reads from the source tree at run time is in the image
    for needed in ("migrations", "frontend", "configs"):
        assert re.search(rf"^COPY {needed}\b", text, flags=re.M), needed


@pytest.mark.slow
def test_the_dockerfile_install_step_works_outside_docker(tmp_path):
    """Runs scripts/install-app.sh (the Dockerfile's RUN step) into a fresh virtual environment."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-app.sh"), str(ROOT)],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(venv / "bin" / "python"), "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "clipscope import check: ok" in proc.stdout
    out = subprocess.run([str(venv / "bin" / "clipscope"), "--help"], capture_output=True, text=True)
    assert "precompute" in out.stdout and "serve" in out.stdout
