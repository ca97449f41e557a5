"""docker-compose.yml is valid and runs the same processes as the Procfile."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest
import yaml

from tests.support.procs import ROOT

INFRA = {"redis", "rabbitmq", "prometheus"}


def procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = shlex.split(command)
    return entries


@pytest.fixture(scope="module")
def compose() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose (Debian package) is missing: run scripts/bootstrap.sh")
    out = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_mirrors_procfile(compose):
    services = compose["services"]
    assert set(services) - INFRA == set(procfile())


def test_same_commands_with_container_addresses(compose):
    for name, argv in procfile().items():
        command = compose["services"][name]["command"]
        if name == "sqs":
            assert command[-2:] == argv[-2:]  # same port, bound for the container network
            continue
        without_host = [a for a in command if a not in ("--host", "0.0.0.0")]
        assert without_host == argv, name


def test_compose_passes_no_secret_literals(compose):
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        assert env.get("TIDEGATE_API_TOKENS", "") == "", name
