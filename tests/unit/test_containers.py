"""Container files: pinned bases, non-root, and the entrypoint's port contract per platform."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "cluster" / "docker"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_pin_bases_and_drop_root(name):
    text = (DOCKER / name).read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    assert ":" in base and not base.endswith(":latest"), base
    assert "\nUSER homefire" in text and 'CMD ["serve"]' in text and "EXPOSE 8080" in text


def _entrypoint(tmp_path, args, **env):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "homefire").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "homefire").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("AIP_HTTP_PORT", "PORT", "HOMEFIRE_SERVE_CONFIG")}
    out = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *args], capture_output=True, text=True, timeout=30,
                         env={**clean, "PATH": f"{fake}:{os.environ['PATH']}", **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_sagemaker_serve_listens_on_8080(tmp_path):
    assert _entrypoint(tmp_path, ["serve"]) == ["serve", "--host", "0.0.0.0", "--port", "8080"]


def test_vertex_port_comes_from_aip_http_port(tmp_path):
    args = _entrypoint(tmp_path, ["serve"], AIP_HTTP_PORT="7080", HOMEFIRE_SERVE_CONFIG="/m/serve.yaml")
    assert args == ["serve", "/m/serve.yaml", "--host", "0.0.0.0", "--port", "7080"]


def test_other_commands_pass_through(tmp_path):
    assert _entrypoint(tmp_path, ["homefire", "models", "list"]) == ["models", "list"]
