"""On-prem for real: `ray up cluster/onprem.yaml` against local test hosts, then serve, train and tear down.

Two hosts (network namespaces on the bridge hfbr0, each running sshd in its own PID/mount namespace; see
tests/netns_hosts.py) stand in for the machines cluster/onprem.yaml names. The test launches the cluster from a copy
of that file with the hosts' IPs, deploys the serve app on it (mock engine) and calls the API from the root namespace
over the bridge, runs a 2-worker DDP step spread over both nodes, checks what listens on the nodes and that Ray's
token authentication refuses a Ray client, a GCS caller and a job submission without the cluster's token, and ends
with `ray down`.

Traffic stays on loopback and the bridge: the namespaces have no default route. Skipped (with the reason) only
without root or where `ip netns` is not permitted; fails when a Debian package it needs is missing (openssh-server,
openssh-client, rsync, iproute2, util-linux).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import netns_hosts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HEAD_IP, WORKER_IP = "10.231.0.2", "10.231.0.3"
HOSTS = {"hf-head": HEAD_IP, "hf-worker": WORKER_IP}
API_PORT, DASHBOARD_PORT, CLIENT_PORT, GCS_PORT, OBJECT_MANAGER_PORT = 8000, 8265, 10001, 6379, 8076
CLIENT_TIMEOUT_S = 120
RAY_UP_TIMEOUT_S = 300
WORKER_JOIN_TIMEOUT_S = 180
RAY_EXEC_TIMEOUT_S = 240
RAY_DOWN_TIMEOUT_S = 120
RESULT_MARK = "HFRESULT "

# Runs on the head (ray exec): wait until both nodes are alive, print their IPs.
NODES_SCRIPT = """
import json, sys, time, ray
ray.init(address="auto", logging_level="ERROR")
deadline = time.time() + float(sys.argv[1])
while True:
    ips = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    if len(ips) >= 2 or time.time() > deadline:
        break
    time.sleep(2)
print("HFRESULT " + json.dumps({"ips": ips, "cpus": ray.cluster_resources().get("CPU")}), flush=True)
"""

# Runs on the head (ray exec): a 2-worker DDP step, one worker per node (STRICT_SPREAD), gloo over eth0.
TRAIN_SCRIPT = """
import json, os, sys, tempfile
import ray
import torch
import torch.distributed as dist
from ray import train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, prepare_model


def train_loop(config):
    torch.manual_seed(0)
    model = prepare_model(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rank = train.get_context().get_world_rank()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(32, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True)
    for _ in range(config["steps"]):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    ips = [None] * dist.get_world_size()
    dist.all_gather_object(ips, ray.util.get_node_ip_address())
    metrics = {"loss": float(loss.item()), "ips": ips, "world_size": dist.get_world_size()}
    # Train keeps the metrics that come with a checkpoint: rank 0 saves the model, the others report only.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(model.module.state_dict(), os.path.join(tmp, "model.pt"))
            checkpoint = train.Checkpoint.from_directory(tmp)
        train.report(metrics, checkpoint=checkpoint)


ray.init(address="auto", logging_level="ERROR", runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "eth0"}})
trainer = TorchTrainer(
    train_loop,
    train_loop_config={"steps": 5},
    torch_config=TorchConfig(backend="gloo"),
    scaling_config=ScalingConfig(num_workers=2, use_gpu=False, placement_strategy="STRICT_SPREAD",
                                 resources_per_worker={"CPU": 1}),
    run_config=RunConfig(name="onprem-ddp", storage_path=sys.argv[1]),
)
result = trainer.fit()
print("HFRESULT " + json.dumps({**result.metrics, "checkpoint": result.checkpoint.path}), flush=True)
"""

# Runs in the root namespace: a Ray client against the head's client server, token from the environment.
CLIENT_SCRIPT = """
import logging, sys, ray
log = logging.getLogger("ray.util.client.worker")  # says why a connection attempt was refused (DEBUG)
log.setLevel(logging.DEBUG)
log.addHandler(logging.StreamHandler(sys.stderr))
ray.init("ray://%s:%d", logging_level="ERROR")

@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()

print("HFRESULT " + ray.get(where.remote()), flush=True)
"""


def _result(out: str) -> object:
    """The value a script printed on its last `HFRESULT <value>` line (JSON where it looks like JSON)."""
    # Anywhere in a line: over `ray exec`'s tty a line may start with the launcher's colour codes.
    lines = [m.group(1) for m in re.finditer(rf"{RESULT_MARK}(\S[^\r\n]*?)\s*$", out, re.M)]
    assert lines, f"no {RESULT_MARK.strip()} line in the output:\n{out[-4000:]}"
    return json.loads(lines[-1]) if lines[-1][:1] in "[{" else lines[-1]


class OnPremCluster:
    """The test hosts plus the launcher: `ray up/exec/down` run with the test's home and a private /tmp."""

    def __init__(self, hosts: netns_hosts.LocalHosts):
        self.hosts = hosts
        self.root = hosts.root
        self.config = self.root / "onprem-test.yaml"
        self.launcher_tmp = self.root / "launcher-tmp"
        self.token = ""

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HOMEFIRE_"))}
        env.update(HOME=str(self.hosts.home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
        env.update(extra)
        return env

    def launcher(self, args: list[str], timeout_s: float, check: bool = True) -> subprocess.CompletedProcess:
        """Run a `ray` launcher command in a mount namespace whose /tmp is the test's (its lock, state and
        SSH control sockets stay in the test directory, away from the root namespace's /tmp/ray)."""
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount --bind {shlex.quote(str(self.launcher_tmp))} /tmp && exec "$@"', "sh",
               os.path.join(os.path.dirname(sys.executable), "ray"), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=self.env(), cwd=self.root)
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args[:1])} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
        return proc

    def exec(self, command: str, timeout_s: float = RAY_EXEC_TIMEOUT_S,
             check: bool = True) -> subprocess.CompletedProcess:
        """`ray exec` on the head: the command runs in a login shell there over SSH."""
        return self.launcher(["exec", str(self.config), command], timeout_s=timeout_s, check=check)

    def write_config(self) -> None:
        """cluster/onprem.yaml with the test hosts' IPs and key; no Docker block and no wheel (the hosts share this
        machine's Python); the start commands keep token auth and the loopback dashboard."""
        cfg = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
        cfg["cluster_name"] = "homefire-onprem-test"
        cfg["min_workers"] = cfg["max_workers"] = 1
        cfg["provider"] = {"type": "local", "head_ip": HEAD_IP, "worker_ips": [WORKER_IP]}
        cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(self.hosts.key)}
        del cfg["docker"]
        cfg["file_mounts"] = {"~/.ray/auth_token": "~/.ray/auth_token"}
        cfg["head_setup_commands"] = []
        cfg["worker_setup_commands"] = []
        assert cfg["head_start_ray_commands"][0] == "ray stop" == cfg["worker_start_ray_commands"][0]
        head, worker = cfg["head_start_ray_commands"][1], cfg["worker_start_ray_commands"][1]
        for cmd in (head, worker):
            assert "RAY_AUTH_MODE=token ray start" in cmd
        assert "--dashboard-host=127.0.0.1" in head
        # Ray 2.60's `ray up` starts the head with autoscaler v2, which never launches the local provider's workers
        # (only v1's StandardAutoscaler records the head in the provider's state file on the head, see
        # ray.autoscaler._private.local.node_provider.record_local_head_state_if_needed). The head command must
        # switch it back to v1; a no-op once cluster/onprem.yaml says so itself.
        if "RAY_enable_autoscaler_v2=0" not in head:
            head = head.replace("RAY_AUTH_MODE=token ray start",
                                "RAY_enable_autoscaler_v2=0 RAY_AUTH_MODE=token ray start")
        small = "--num-cpus=2 --num-gpus=0 --memory=2147483648 --object-store-memory=268435456"
        cfg["head_start_ray_commands"][1] = (
            re.sub(r"--num-cpus=\S+ --num-gpus=\S+ --memory=\S+", small, head) + f" --node-ip-address={HEAD_IP}")
        cfg["worker_start_ray_commands"][1] = (
            re.sub(r"--num-cpus=\S+ --num-gpus=\S+ --memory=\S+", small, worker) + f" --node-ip-address={WORKER_IP}")
        assert small in cfg["head_start_ray_commands"][1] and small in cfg["worker_start_ray_commands"][1]
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def up(self) -> None:
        self.launcher_tmp.mkdir()
        # The cluster's shared secret, in the home every host (and the launcher) uses.
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "get-auth-token", "--generate"],
                       env=self.env(), capture_output=True, text=True, timeout=60, check=True)
        self.token = (self.hosts.home / ".ray" / "auth_token").read_text().strip()
        assert self.token
        self.write_config()
        self.launcher(["up", "-y", "--no-config-cache", str(self.config)], timeout_s=RAY_UP_TIMEOUT_S)

    def down(self) -> subprocess.CompletedProcess:
        return self.launcher(["down", "-y", str(self.config)], timeout_s=RAY_DOWN_TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def cluster():
    try:
        netns_hosts.check_host_support()
    except netns_hosts.HostSetupUnavailable as err:
        pytest.skip(f"on-prem cluster test needs local test hosts: {err}")
    missing = netns_hosts.missing_tools()
    if missing:
        pytest.fail(f"the test hosts need these Debian packages: apt-get install -y {' '.join(missing)}")
    hosts = netns_hosts.LocalHosts.create(HOSTS, netns_hosts.make_test_root())
    c = OnPremCluster(hosts)
    problems: list[str] = []
    try:
        hosts.start()
        c.up()
        yield c
    finally:
        failing = sys.exc_info()[0] is not None
        try:
            if c.config.is_file():
                down = c.down()
                if down.returncode != 0:
                    problems.append(f"ray down failed ({down.returncode}): {down.stderr[-2000:]}")
        finally:
            problems += hosts.close()
        if problems and not failing:  # (while failing, the first error is the one to see)
            pytest.fail(f"teardown left things behind: {problems}")


@pytest.fixture(scope="module")
def nodes(cluster: OnPremCluster) -> dict:
    """Both nodes joined (the head's autoscaler starts Ray on the worker over SSH after `ray up`)."""
    script = cluster.root / "nodes.py"
    script.write_text(NODES_SCRIPT)
    out = cluster.exec(f"python {script} {WORKER_JOIN_TIMEOUT_S}", timeout_s=WORKER_JOIN_TIMEOUT_S + 60)
    found = _result(out.stdout)
    if len(found["ips"]) < 2:  # say why: the head's autoscaler log
        log = cluster.exec("tail -n 60 /tmp/ray/session_latest/logs/monitor.log", check=False, timeout_s=60)
        pytest.fail(f"the worker did not join within {WORKER_JOIN_TIMEOUT_S}s: {found}\n{log.stdout[-5000:]}")
    return found


@pytest.fixture(scope="module")
def serve_app(cluster: OnPremCluster, nodes: dict) -> str:
    """The serve app (mock engine on the offline tiny model) deployed on the cluster from the head; its base URL."""
    from homefire.models.build import ensure_model
    from homefire.registry import Registry

    model = ensure_model("demo-tiny", Registry(cluster.root / "registry")).path
    cfg = cluster.root / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "tiny", "source": str(model), "engine": "mock", "cpus": 0.2}]}))
    out = cluster.exec(f"homefire serve {cfg} --address auto --detach --host 0.0.0.0 --port {API_PORT}")
    assert "ready in" in out.stdout, out.stdout[-4000:]
    return f"http://{HEAD_IP}:{API_PORT}/v1"


def test_ray_up_brings_head_and_worker(nodes: dict):
    assert nodes["ips"] == [HEAD_IP, WORKER_IP], nodes
    assert nodes["cpus"] == 4.0, nodes


def test_serve_app_answers_from_the_root_namespace(serve_app: str):
    from openai import OpenAI

    client = OpenAI(base_url=serve_app, api_key="unused", timeout=30, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="hello", max_tokens=4)
    assert done.choices[0].text
    assert done.usage.completion_tokens == 4


def test_two_worker_training_step_spans_both_nodes(cluster: OnPremCluster, nodes: dict):
    script = cluster.root / "train_step.py"
    script.write_text(TRAIN_SCRIPT)
    storage = cluster.root / "train-runs"
    storage.mkdir(exist_ok=True)
    out = cluster.exec(f"python {script} {storage}").stdout
    metrics = _result(out)
    assert isinstance(metrics, dict), out[-4000:]
    assert metrics["world_size"] == 2
    assert sorted(metrics["ips"]) == [HEAD_IP, WORKER_IP], metrics
    assert math.isfinite(metrics["loss"]), metrics
    # The checkpoint rank 0 wrote lies in the storage path both nodes share.
    assert metrics["checkpoint"].startswith(str(storage)), metrics
    assert (Path(metrics["checkpoint"]) / "model.pt").is_file(), metrics


def _addr(raw: str) -> str:
    """ss's local address as one spelling: `any` for every interface (0.0.0.0, *, [::]), IPv4 for v4-mapped."""
    addr = raw.strip("[]")
    if addr in ("*", "0.0.0.0", "::"):
        return "any"
    return addr.removeprefix("::ffff:")


def _listening(host: netns_hosts.Host) -> list[dict]:
    """Listening TCP sockets in the host's network namespace, with the owning processes' names and command lines
    (ss runs in the host's network namespace but reads the root namespace's /proc, which sees every process)."""
    out = host.netns_exec(["ss", "-ltnpH"]).stdout
    socks = []
    for line in out.splitlines():
        addr, port = line.split()[3].rsplit(":", 1)
        owners = []
        for pid in sorted({int(p) for p in re.findall(r"pid=(\d+)", line)}):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except FileNotFoundError:
                continue
            owners.append({"pid": pid, "comm": comm, "cmdline": cmdline.strip()[:200]})
        socks.append({"addr": _addr(addr), "port": int(port), "owners": owners})
    return socks


def _is_ray(owner: dict) -> bool:
    """A Ray process: Ray's binaries (gcs_server, raylet), a Python process running a script or module of the ray
    package (dashboard, monitor, `-m ray.util.client.server`), or a Ray worker or agent (process title `ray::...`)."""
    ray_pkg = os.path.dirname(importlib.util.find_spec("ray").origin) + "/"
    cmd = owner["cmdline"]
    return (owner["comm"] in ("gcs_server", "raylet") or cmd.startswith("ray::") or ray_pkg in cmd
            or re.search(r"python[0-9.]* -m ray\.", cmd) is not None)


def test_nodes_listen_only_on_api_ray_and_loopback_dashboard(cluster: OnPremCluster, serve_app: str):
    """Every listening socket on a node is the host's sshd, or Ray's (GCS, raylet, object manager, agents, client
    server, Serve's proxy on the API port); the dashboard (job API) listens on the head's loopback only."""
    for host in cluster.hosts.hosts:
        socks = _listening(host)
        listing = "".join(f"\n  {s['addr']}:{s['port']} {[o['comm'] for o in s['owners']]}" for s in socks)
        print(f"{host.name} listens on:{listing}")  # shown with -rA
        assert socks, f"nothing listens on {host.name}"
        not_ray = []
        for s in socks:
            if s["port"] == 22 and s["addr"] == host.ip and {o["comm"] for o in s["owners"]} == {"sshd"}:
                continue  # the test host's own SSH (the launcher's way in)
            if not s["owners"] or not all(_is_ray(o) for o in s["owners"]):
                not_ray.append(s)  # includes sockets whose owner cannot be told: not accepted
        assert not not_ray, f"{host.name}: listening sockets not owned by Ray: {not_ray}"
        ports = {s["port"] for s in socks}
        dashboard = {s["addr"] for s in socks if s["port"] == DASHBOARD_PORT}
        if host.ip == HEAD_IP:
            assert dashboard == {"127.0.0.1"}, f"dashboard listens on {dashboard}"
            assert {s["addr"] for s in socks if s["port"] == API_PORT} == {"any"}, socks
            assert {GCS_PORT, CLIENT_PORT, OBJECT_MANAGER_PORT, API_PORT} <= ports, sorted(ports)
        else:
            assert not dashboard, f"a dashboard listens on the worker: {dashboard}"
            assert OBJECT_MANAGER_PORT in ports, sorted(ports)
    # From the root namespace, the dashboard is not reachable on the head's address.
    with pytest.raises(OSError):
        socket.create_connection((HEAD_IP, DASHBOARD_PORT), timeout=5).close()


def _client(cluster: OnPremCluster, token: str) -> subprocess.Popen:
    """A Ray client from the root namespace to the head's client server with ``token``; client debug logs on
    stderr (the client retries a refused connection and only logs why)."""
    empty_home = cluster.root / "client-home"
    empty_home.mkdir(exist_ok=True)  # no ~/.ray/auth_token to fall back on
    env = cluster.env(HOME=str(empty_home), RAY_AUTH_TOKEN=token)
    return subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT % (HEAD_IP, CLIENT_PORT)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cluster.root)


def test_ray_client_needs_the_cluster_token(cluster: OnPremCluster, nodes: dict):
    # Both at once: the refused one retries for ~30 s before it gives up.
    wrong, right = _client(cluster, "not-the-cluster-token"), _client(cluster, cluster.token)
    try:
        out, err = right.communicate(timeout=CLIENT_TIMEOUT_S)
        if right.returncode != 0 and "Starting Ray client server failed" in err:
            # The client server spawns one server process per connection; on two busy cores that spawn has
            # failed once in several runs. One more try tells a flake from a refusal.
            right = _client(cluster, cluster.token)
            out, err = right.communicate(timeout=CLIENT_TIMEOUT_S)
        if right.returncode != 0:  # say why: the head's client server logs
            logs = cluster.exec("tail -n 30 /tmp/ray/session_latest/logs/ray_client_server*.err", check=False)
            pytest.fail(f"the client with the cluster's token failed:\n{err[-3000:]}\nhead:\n{logs.stdout[-5000:]}")
        assert _result(out) in (HEAD_IP, WORKER_IP)
        out, err = wrong.communicate(timeout=CLIENT_TIMEOUT_S)
        assert wrong.returncode != 0, out
        # What the server answered to each attempt, then the client's verdict.
        assert "Invalid or missing authentication token" in err, err[-3000:]
        assert "ConnectionError: ray client connection timeout" in err, err[-3000:]
    finally:
        for proc in (wrong, right):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_gcs_needs_the_cluster_token(cluster: OnPremCluster, nodes: dict):
    """The GCS listens on every interface of the head; from the root namespace it answers only with the token."""
    def status(token: str) -> subprocess.CompletedProcess:
        env = cluster.env(HOME=str(cluster.root / "client-home"), RAY_AUTH_TOKEN=token)
        (cluster.root / "client-home").mkdir(exist_ok=True)
        return subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "status", "--address",
                               f"{HEAD_IP}:{GCS_PORT}"], capture_output=True, text=True, timeout=60, env=env)

    wrong = status("not-the-cluster-token")
    assert wrong.returncode != 0, wrong.stdout
    assert "AuthenticationError" in wrong.stderr and "InvalidAuthToken" in wrong.stderr, wrong.stderr[-3000:]
    right = status(cluster.token)
    assert right.returncode == 0, right.stderr[-3000:]
    assert "Autoscaler status" in right.stdout, right.stdout[-3000:]


def test_job_submission_needs_the_cluster_token(cluster: OnPremCluster, nodes: dict):
    """The job API (the dashboard, on the head's loopback) refuses a submission on the head with a wrong token and
    runs it with the cluster's."""
    submit = f"ray job submit --address http://127.0.0.1:{DASHBOARD_PORT} -- echo hf-job-ran"
    wrong = cluster.exec(f"RAY_AUTH_TOKEN=not-the-cluster-token {submit}; echo HFRESULT rc=$?", check=False)
    assert _result(wrong.stdout) == "rc=1", wrong.stdout[-3000:]
    assert "authentication token is invalid" in wrong.stdout, wrong.stdout[-3000:]
    assert "hf-job-ran\r" not in wrong.stdout and "hf-job-ran\n" not in wrong.stdout
    right = cluster.exec(f"{submit}; echo HFRESULT rc=$?", check=False)
    assert _result(right.stdout) == "rc=0", right.stdout[-3000:]
    assert re.search(r"^hf-job-ran\r?$", right.stdout, re.M), right.stdout[-3000:]
