"""`homefire serve`'s start checks: a busy port named with its owner and the fix; the cause of a failed deploy."""

from __future__ import annotations

import os
import socket

import pytest

from homefire.errors import ConfigError
from homefire.serve.runner import check_port, last_exception, port_holder, port_in_use


def test_a_listening_port_is_refused_naming_the_process_and_the_fix():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        assert port_holder(port)[0] == os.getpid()
        with pytest.raises(ConfigError) as err:
            check_port("127.0.0.1", port)
    msg = str(err.value)
    assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in msg and f"--port {port + 10}" in msg
    check_port("127.0.0.1", port)  # free again: no error


def test_the_last_traceback_of_the_controller_log_is_the_cause(tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "controller_1.log").write_text(
        "INFO ... Deploying\n"
        "ERROR ... first failure\nTraceback (most recent call last):\n  File \"a.py\", line 1\nValueError: old\n"
        "ERROR ... Failed to update the deployments ['ingress'].\n"
        "Traceback (most recent call last):\n  File \"ingress.py\", line 9, in start\n    bind()\n"
        "ray.serve._private.common.NoAvailablePortError: no free port in [8000, 8001]\n"
        "INFO ... later line\n"
    )
    cause = last_exception(tmp_path)
    assert "NoAvailablePortError: no free port in [8000, 8001]" in cause
    assert "ValueError: old" not in cause and "later line" not in cause
    assert last_exception(tmp_path / "nowhere") == ""
