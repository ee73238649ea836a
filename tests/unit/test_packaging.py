"""The wheel holds every package; `import homefire` and `homefire --help` stay light."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["homefire", "homefire.models", "homefire.convert", "homefire.serve", "homefire.serve.engines", "homefire.train",
            "homefire.tune"]


def test_wheel_contains_and_imports_every_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("homefire-*.whl"))
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(target)
    assert "homefire/serve/configs/default.yaml" in names
    assert "homefire/serve/dashboards/homefire.json" in names
    code = "import importlib; " + "; ".join(f"importlib.import_module('{p}')" for p in PACKAGES)
    code += "; import homefire.serve as s; assert s.__file__.startswith(%r)" % str(target)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PYTHONPATH": str(target)}, timeout=120)
    # The capacity planner runs from the wheel: its GPU and model-shape tables ship as package data.
    assert {"homefire/serve/data/gpus.yaml", "homefire/serve/data/model_shapes.yaml"} <= set(names)
    shipped = target / "homefire" / "serve" / "configs" / "llama-70b-tp.yaml"
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; from homefire.cli import main; sys.exit(main(['plan', {str(shipped)!r}, "
         "'--gpu', 'h100', '--json']))"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "HOME": str(tmp_path)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert [r["tp"] for r in json.loads(out.stdout)["models"][0]["rows"]] == [2, 4]


def test_import_and_help_do_not_import_heavy_dependencies():
    code = (
        "import sys, homefire, homefire.cli, homefire.serve\n"
        "try:\n    homefire.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_serve_folder_cannot_be_imported_under_its_bare_name():
    out = subprocess.run([sys.executable, "-c", "import serve"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "import it as homefire.serve" in out.stderr
