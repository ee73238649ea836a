"""Local test hosts for the on-prem cluster test: network namespaces on a bridge, each running sshd.

Each host is a network namespace with one veth (``eth0``) on the bridge ``hfbr0`` in the root namespace, and an sshd
running inside its own PID and mount namespace. In that mount namespace ``/tmp``, ``/dev/shm`` and ``/run`` are
private tmpfs mounts (so the Ray session directories of the hosts and of the root namespace never meet, and a
``ray stop`` on a host only sees that host's processes), and ``/etc/passwd`` is replaced by a copy in which root's
home is the test's own home directory (so ``~/.ray/auth_token``, ``~/ray_bootstrap_*`` and the shell profile the
launcher sources are the test's, not the machine's). Everything else (Python, site-packages with ray and homefire)
is shared with the root namespace, so nothing is installed on the hosts.

The sshd is PID 1 of its host's PID namespace and ``unshare --kill-child`` ties it to the process the test started:
killing that process (by its PID in the root namespace, which the test knows) ends every process on the host.
No route leaves the bridge: the namespaces get no default route.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BRIDGE = "hfbr0"
BRIDGE_CIDR = "10.231.0.1/24"
SSH_START_TIMEOUT_S = 20.0
CMD_TIMEOUT_S = 30.0


class HostSetupUnavailable(RuntimeError):
    """This machine cannot create the test hosts (not root, no `ip netns`, no sshd); the reason says which."""


def _run(cmd: list[str], timeout_s: float = CMD_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip()
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {why}")
    return proc


def _link_exists(name: str) -> bool:
    return _run(["ip", "link", "show", name], check=False).returncode == 0


def _netns_exists(name: str) -> bool:
    return name in _run(["ip", "netns", "list"]).stdout.split()


def check_host_support() -> None:
    """Raise HostSetupUnavailable with the reason when this machine cannot have network namespaces (not root, or
    `ip netns` not permitted, e.g. in an unprivileged container)."""
    if os.geteuid() != 0:
        raise HostSetupUnavailable("needs root (network namespaces, a bridge and sshd as root)")
    if shutil.which("ip") is None:
        raise HostSetupUnavailable("`ip` (iproute2) is not installed")
    probe = f"hf-probe-{os.getpid()}"
    proc = _run(["ip", "netns", "add", probe], check=False)
    if proc.returncode != 0:
        raise HostSetupUnavailable(f"`ip netns add` is not permitted here: {proc.stderr.strip()}")
    _run(["ip", "netns", "del", probe], check=False)


def missing_tools() -> list[str]:
    """The Debian packages the hosts need that are not installed (the test fails, not skips, on these)."""
    need = {"/usr/sbin/sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
            "rsync": "rsync", "ss": "iproute2", "unshare": "util-linux"}
    missing = set()
    for tool, pkg in need.items():
        found = Path(tool).is_file() if tool.startswith("/") else shutil.which(tool) is not None
        if not found:
            missing.add(pkg)
    return sorted(missing)


@dataclass
class Host:
    """One test host: a network namespace with an IP on the bridge and an sshd in its own PID/mount namespace."""

    name: str
    ip: str
    dir: Path
    sshd: subprocess.Popen | None = None
    veth: str = ""

    def netns_exec(self, cmd: list[str], timeout_s: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the host's network namespace (root's PID and mount namespace: for `ss`, `ip`)."""
        return _run(["ip", "netns", "exec", self.name, *cmd], timeout_s=timeout_s)


@dataclass
class LocalHosts:
    """Bridge + hosts + sshd, created by ``start()`` and removed, whatever state they reached, by ``close()``."""

    hosts: list[Host]
    root: Path
    home: Path = field(init=False)
    key: Path = field(init=False)
    _bridge_created: bool = field(default=False, init=False)

    @classmethod
    def create(cls, hosts: dict[str, str], root: Path) -> "LocalHosts":
        obj = cls(hosts=[Host(name=n, ip=ip, dir=root / n) for n, ip in hosts.items()], root=root)
        obj.home = root / "home"
        obj.key = root / "id_ed25519"
        return obj

    # --- setup ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        for h in self.hosts:
            if _netns_exists(h.name):
                raise RuntimeError(
                    f"network namespace {h.name} already exists (a leftover?); remove it: ip netns del {h.name}")
        if _link_exists(BRIDGE):
            raise RuntimeError(f"link {BRIDGE} already exists (a leftover?); remove it: ip link del {BRIDGE}")
        self._write_files()
        self._network()
        for h in self.hosts:
            self._start_sshd(h)
        for h in self.hosts:
            self.wait_for_ssh(h)

    def _write_files(self) -> None:
        self.home.mkdir(parents=True)
        (self.home / ".ray").mkdir()
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "homefire-onprem-test", "-f", str(self.key)])
        (self.root / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        # The hosts' login shells: the Python that runs this test (ray, homefire on PATH) and token auth on.
        bin_dir = os.path.dirname(sys.executable)
        profile = (
            f"export PATH={shlex.quote(bin_dir)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            "export RAY_AUTH_MODE=token\n"
            "export RAY_USAGE_STATS_ENABLED=0\n"
        )
        (self.home / ".bashrc").write_text(profile)
        (self.home / ".profile").write_text('[ -f ~/.bashrc ] && . ~/.bashrc\n')
        passwd = []
        for line in Path("/etc/passwd").read_text().splitlines():
            parts = line.split(":")
            if parts[0] == "root":
                parts[5], parts[6] = str(self.home), "/bin/bash"
            passwd.append(":".join(parts))
        (self.root / "passwd").write_text("\n".join(passwd) + "\n")
        for h in self.hosts:
            h.dir.mkdir()
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(h.dir / "ssh_host_ed25519_key")])
            (h.dir / "sshd_config").write_text(
                f"ListenAddress {h.ip}\n"
                "Port 22\n"
                f"HostKey {h.dir / 'ssh_host_ed25519_key'}\n"
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\n"
                "PubkeyAuthentication yes\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "UseDNS no\n"
                "MaxSessions 64\n"
                "MaxStartups 64\n"
                f"PidFile {h.dir / 'sshd.pid'}\n"
                "Subsystem sftp internal-sftp\n"
            )

    def _network(self) -> None:
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        self._bridge_created = True
        _run(["ip", "addr", "add", BRIDGE_CIDR, "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for i, h in enumerate(self.hosts):
            _run(["ip", "netns", "add", h.name])
            h.veth = f"hfv{i}-{os.getpid() % 10000}"  # the root end; at most 15 characters
            _run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", f"{h.veth}p"])
            _run(["ip", "link", "set", h.veth, "master", BRIDGE])
            _run(["ip", "link", "set", h.veth, "up"])
            _run(["ip", "link", "set", f"{h.veth}p", "netns", h.name])
            ns = ["ip", "netns", "exec", h.name]
            _run([*ns, "ip", "link", "set", f"{h.veth}p", "name", "eth0"])
            _run([*ns, "ip", "addr", "add", f"{h.ip}/24", "dev", "eth0"])
            _run([*ns, "ip", "link", "set", "eth0", "up"])
            _run([*ns, "ip", "link", "set", "lo", "up"])

    def _start_sshd(self, h: Host) -> None:
        inner = " && ".join([
            "mount -t tmpfs -o size=2g,mode=1777 tmpfs /tmp",
            "mount -t tmpfs -o size=1g,mode=1777 tmpfs /dev/shm",
            "mount -t tmpfs -o size=16m,mode=755 tmpfs /run",
            "mkdir -p /run/sshd",
            f"mount --bind {shlex.quote(str(self.root / 'passwd'))} /etc/passwd",
            f"exec /usr/sbin/sshd -D -f {shlex.quote(str(h.dir / 'sshd_config'))}"
            f" -E {shlex.quote(str(h.dir / 'sshd.log'))}",
        ])
        with open(h.dir / "unshare.log", "wb") as log:
            h.sshd = subprocess.Popen(
                ["ip", "netns", "exec", h.name, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "--propagation", "private", "sh", "-c", inner],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        (h.dir / "sshd.rootpid").write_text(str(h.sshd.pid))

    def ssh_cmd(self, h: Host, command: str) -> list[str]:
        return ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"root@{h.ip}", command]

    def wait_for_ssh(self, h: Host) -> None:
        deadline = time.monotonic() + SSH_START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            if h.sshd is not None and h.sshd.poll() is not None:
                raise RuntimeError(f"sshd on {h.name} exited ({h.sshd.returncode}): {self.logs(h)}")
            proc = _run(self.ssh_cmd(h, "echo $HOME"), check=False, timeout_s=15)
            if proc.returncode == 0 and proc.stdout.strip() == str(self.home):
                return
            last = proc.stderr.strip() or proc.stdout.strip()
            time.sleep(0.5)
        raise RuntimeError(f"no SSH login on {h.name} ({h.ip}) within {SSH_START_TIMEOUT_S}s: {last}; {self.logs(h)}")

    def logs(self, h: Host) -> str:
        out = []
        for name in ("unshare.log", "sshd.log"):
            p = h.dir / name
            if p.is_file():
                out.append(f"{name}: {p.read_text(errors='replace')[-2000:]}")
        return " | ".join(out)

    # --- teardown ------------------------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every host's processes, delete namespaces, veths and bridge; return what could not be removed."""
        problems: list[str] = []
        for h in self.hosts:
            if h.sshd is None:
                continue
            # The process the test started; --kill-child SIGKILLs the host's PID 1 (sshd) when it dies, and the
            # kernel then kills everything else in that PID namespace.
            if h.sshd.poll() is None:
                h.sshd.send_signal(signal.SIGTERM)
                try:
                    h.sshd.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    h.sshd.kill()
                    h.sshd.wait(timeout=10)
        for h in self.hosts:
            if _netns_exists(h.name):
                deadline = time.monotonic() + 10
                while True:  # wait until no process is left in the namespace (its PID namespace is gone by now)
                    pids = _run(["ip", "netns", "pids", h.name], check=False).stdout.split()
                    if not pids or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                if pids:
                    problems.append(f"processes still in netns {h.name}: {pids}")
                proc = _run(["ip", "netns", "del", h.name], check=False)
                if proc.returncode != 0:
                    problems.append(f"ip netns del {h.name}: {proc.stderr.strip()}")
            if h.veth and _link_exists(h.veth):
                _run(["ip", "link", "del", h.veth], check=False)
        if self._bridge_created and _link_exists(BRIDGE):
            proc = _run(["ip", "link", "del", BRIDGE], check=False)
            if proc.returncode != 0:
                problems.append(f"ip link del {BRIDGE}: {proc.stderr.strip()}")
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            problems.append(f"could not remove {self.root}")
        return problems


def make_test_root() -> Path:
    """A fresh directory every host sees (not under /tmp, which is private on the hosts)."""
    return Path(tempfile.mkdtemp(prefix="homefire-onprem-", dir="/var/tmp"))
