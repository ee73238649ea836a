"""The ``homefire`` command. Importing this module imports neither torch, vllm nor ray.

    homefire serve [CONFIG]      serve models behind an OpenAI-compatible API (default: the offline demo)
    homefire status              replicas running / starting / pending per model
    homefire plan [CONFIG]       what a serve config needs per GPU type: memory, KV cache, TP, tokens/s, replicas, cost
    homefire train CONFIG        fine-tune (LoRA or full) on Ray Train; --serve hands the adapter to a running server
    homefire tune CONFIG         sweep quantized variants on Ray Tune; report + serve config for the best
    homefire models build|build-demo|convert|list|load
                                 build / pretrain the offline demo models; make ONNX / GGUF / vLLM-quantized
                                 variants; list the registry as a tree; load an adapter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from homefire import __version__, constants
from homefire.errors import ConfigError, HomefireError


def _flags_from_model(parser: argparse.ArgumentParser, model: type, fields: list[str]) -> None:
    """Add ``--field`` flags whose help and type come from the config model (defaults stay there)."""
    for name in fields:
        f = model.model_fields[name]
        choices = getattr(f.annotation, "__args__", None) if getattr(f.annotation, "__origin__", None) is Literal else None
        ann = f.annotation if f.annotation in (int, float, str) else str
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=ann, default=None, choices=choices,
            help=f"{f.description} (default: {f.default})",
        )


def _run_flags(parser: argparse.ArgumentParser, config_help: str, set_example: str,
               resume: tuple[str, str] = ("RUN", "continue RUN (a run id or run directory) from its last checkpoint"),
               ) -> None:
    """CONFIG, --address, --resume and --set: what every command that runs a config on Ray takes."""
    parser.add_argument("config", help=config_help)
    parser.add_argument("--address", help="Ray cluster to run on (e.g. 'auto'); default: start a local Ray")
    parser.add_argument("--resume", metavar=resume[0], help=resume[1])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {set_example} (YAML value syntax)")
    parser.add_argument("--verbose", action="store_true",
                        help="print Ray's and the workers' own log lines here (default: only their log folder)")


def _server_flags(parser: argparse.ArgumentParser) -> None:
    """--url / --api-key of a running homefire server (train --serve, models load)."""
    parser.add_argument("--url", default=f"http://{constants.DEFAULT_HOST}:{constants.DEFAULT_PORT}",
                        help="a running homefire server")
    parser.add_argument("--api-key", default=os.environ.get(constants.API_KEY_ENV),
                        help="the server's API key (default $HOMEFIRE_API_KEY)")


def _plan_parser(sub: Any) -> None:
    from homefire.serve.plan import Workload
    from homefire.serve.specs import DEFAULT_GPUS

    pl = sub.add_parser(
        "plan", help="capacity plan of a serve config: memory, KV cache, smallest TP, tokens/s, replicas, cost",
        description="For every vLLM model of a serve config and each GPU type: weight memory, KV-cache bytes per "
        "token, the KV-cache tokens and concurrent requests that fit in the model's memory share, the smallest "
        "tensor-parallel size that fits, roofline estimates of decode and prefill tokens/s, the replicas the "
        "workload needs and their cost. A CPU model (gpus: 0) is planned against vLLM's CPU KV cache (kv_cache_gb). "
        "Model shapes are read offline: config.json of a local directory, a registry entry or the Hugging Face "
        "cache, else a shipped table of well-known models. Starts nothing.",
        epilog="examples:\n  homefire plan serve/configs/default.yaml\n"
        "  homefire plan serve/configs/llama-70b-tp.yaml --gpu h100 --gpu l4 --workload in=2000,out=300,rps=5\n"
        "  homefire plan cfg.yaml --prices my-gpus.yaml --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("config", nargs="?", help="serve YAML (default: the embedded demo config)")
    pl.add_argument("--gpu", action="append", default=[], metavar="NAME",
                    help="a GPU type to plan on, repeatable (default for a GPU config: "
                    f"{', '.join(DEFAULT_GPUS)}; none for a CPU one); names from serve/data/gpus.yaml")
    fields = ", ".join(f"{f.alias or n}: {f.description.lower().rstrip('.')}"
                       for n, f in Workload.model_fields.items())
    pl.add_argument("--workload", metavar="in=N,out=N,rps=R",
                    help=f"the traffic to plan for ({fields}; default: {Workload.example()})")
    pl.add_argument("--prices", metavar="FILE", help="a YAML of GPU prices/specs laid over the shipped table")
    pl.add_argument("--json", action="store_true", help="print JSON")


def _build_parser() -> argparse.ArgumentParser:
    from homefire.serve.config import ServerConfig

    p = argparse.ArgumentParser(
        prog="homefire",
        description="Run your own LLMs on your own hardware, on Ray: serve, train, tune.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  homefire serve                         # offline demo models on http://127.0.0.1:8000\n"
        "  homefire serve serve/configs/gpu-fractional.yaml --host 0.0.0.0\n  homefire status\n"
        "  homefire plan serve/configs/llama-70b-tp.yaml --gpu h100 --gpu l4   # what fits where, and its cost\n"
        "  homefire train train/configs/demo-lora.yaml --serve   # fine-tune, then serve as demo-tiny:homefire-answer\n"
        "  homefire models build-demo                    # pretrain the demo models so they answer in English",
    )
    p.add_argument("--version", action="version", version=f"homefire {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve", help="serve models behind an OpenAI-compatible API",
        description="Start (or connect to) Ray and deploy the serve app. With no CONFIG, serves the embedded "
        "default: two offline demo models on the vLLM engine. CONFIG is a homefire serve YAML or a Serve config "
        "whose application runs homefire.serve:build_app. Blocks until Ctrl-C or SIGTERM, which drain: new requests get "
        "503, those in flight finish (server.drain_timeout_s, default 30 s), then Ray stops and the command exits 0.",
    )
    s.add_argument("config", nargs="?", help="serve YAML (default: the embedded demo config)")
    _flags_from_model(s, ServerConfig, ["host", "port", "proxy"])
    s.add_argument("--address", help="Ray cluster to deploy to (e.g. 'auto'); default: start a local Ray")
    s.add_argument("--num-cpus", type=float, help="logical CPUs for a local Ray (default: enough for the config)")
    s.add_argument("--num-gpus", type=float, help="logical GPUs for a local Ray (default: detected)")
    s.add_argument("--detach", action="store_true", help="return once the app is ready, leaving it running")
    s.add_argument("--verbose", action="store_true",
                   help="print Ray's, Serve's and the engines' own log lines here (default: only their log folder)")

    st = sub.add_parser("status", help="replicas running, starting and pending per model")
    st.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    st.add_argument("--app", default=constants.SERVE_APP_NAME, help="Serve application name")
    st.add_argument("--json", action="store_true", help="print JSON")

    _plan_parser(sub)

    t = sub.add_parser(
        "train", help="fine-tune a model (LoRA or full) on Ray Train",
        description="Run a training config on Ray Train: checks the config and data first (a bad row is named by "
        "file and line), trains on the config's workers with checkpoints, evaluates before and after, writes "
        "report.json and loss_curve.png to the run directory, and registers the adapter with its lineage.",
        epilog="examples:\n  homefire train train/configs/demo-lora.yaml\n"
        "  homefire train train/configs/demo-lora.yaml --serve --url http://127.0.0.1:8000\n"
        "  homefire train train/configs/demo-lora.yaml --resume homefire-answer-20261128-120000-ab12\n"
        "  homefire train cfg.yaml --set scaling.workers=4 --set optim.lr=1e-4 --address auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _run_flags(t, "training YAML (see train/configs/)", "optim.lr=1e-4")
    t.add_argument("--serve", action="store_true", help="load the trained adapter into the running server at --url")
    _server_flags(t)

    d = sub.add_parser(
        "distill", help="train a smaller or pruned student from a teacher's logits on Ray Train (a registry entry)",
        description="Knowledge distillation through the `homefire train` pipeline (workers, checkpoints, --resume, "
        "eval before/after, registry): every parameter of the student (model.source, e.g. a pruned variant) learns "
        "loss = (1-alpha)*cross-entropy + alpha*T^2*KL(teacher || student) on the data; the teacher is frozen and must "
        "share the student's vocabulary. The config is a training config with method: distill (set for you) and a "
        "distill section.",
        epilog="examples:\n  homefire models convert demo --to prune-layers-25\n"
        "  homefire distill train/configs/demo-distill.yaml\n"
        "  homefire distill cfg.yaml --set distill.alpha=0.9 --set optim.max_steps=200",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _run_flags(d, "training YAML with a distill section (see train/configs/demo-distill.yaml)", "distill.alpha=0.9")
    d.set_defaults(serve=False, url=None, api_key=None, distill=True)

    tu = sub.add_parser(
        "tune", help="sweep a model's quantized and pruned variants on Ray Tune; report, Pareto plot, serve config "
        "for the best",
        description="Run a sweep config on Ray Tune: one trial per format in space.quantize and per pruning in "
        "space.prune, plus the original (fp32 transformers, the reference). Each trial makes the variant (homefire "
        "models convert), starts the engine that would serve it, and measures held-out perplexity, KL divergence and "
        "top-1 agreement with the original, decode tokens/s and TTFT at each concurrency, peak memory and size. The "
        "best variant within select's bounds gets a serve config.",
        epilog="examples:\n  homefire tune tune/configs/demo-quantize.yaml\n"
        "  homefire tune tune/configs/demo-quantize.yaml --resume ~/.cache/homefire/tune/demo-quantize\n"
        "  homefire tune cfg.yaml --set select.max_ppl_increase=0.05 --set select.concurrency=8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _run_flags(tu, "sweep YAML (see tune/configs/)", "select.max_ppl_increase=0.05",
               resume=("DIR", "continue the sweep in DIR (<storage>/<name>) after its driver died"))

    m = sub.add_parser("models", help="build / pretrain the offline demo models; list the registry; load an adapter")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    b = msub.add_parser("build", help="build offline models (default: all demo models, random init), cached by recipe")
    b.add_argument("names", nargs="*", help="demo model names (default: all)")
    bd = msub.add_parser(
        "build-demo", help="pretrain the demo models on the English text that ships with Python (minutes; cached)",
        description="Full-parameter pretraining of the offline demo models on pydoc's topic help (~750 KB of "
        "English), through the same Ray Train pipeline as `homefire train`. Registered as a new version of each "
        "model (e.g. demo@2), which `homefire serve` then serves; cached by recipe.",
    )
    bd.add_argument("names", nargs="*", help="demo model names (default: all)")
    bd.add_argument("--address", help="Ray cluster to run on; default: a local Ray")
    bd.add_argument("--verbose", action="store_true",
                    help="print Ray's and the workers' own log lines here (default: only their log folder)")
    from homefire.convert import PRUNE_TARGETS, TARGETS, target

    cv = msub.add_parser(
        "convert", help="make an optimized format of a model (ONNX, GGUF, vLLM int8/int4, pruned) as a new registry "
        "entry",
        description="Convert a Hugging Face model (a registry entry, a demo name or a directory) into a format "
        "another engine serves, or prune it, registered as a new entry whose parent is the source. Serve it with "
        "`engine: onnx` (onnx-*), `engine: llamacpp` (gguf-*) or `engine: vllm` (vllm-*, prune-*).",
        epilog="formats:\n" + "\n".join(f"  {k:<11} {t.about}" for k, t in TARGETS.items())
        + "\n\npruning (prune-<method>-<percent removed>; 2of4 for the 2:4 pattern), e.g.:\n"
        + "\n".join(f"  {k:<21} {target(k).about}" for k in PRUNE_TARGETS)
        + "\n\nexample:\n  homefire models convert demo --to gguf-q8_0     # -> entry demo-gguf-q8_0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cv.add_argument("source", help="registry entry (demo, demo@2), demo model name, or model directory")
    cv.add_argument("--to", required=True, metavar="FORMAT", help="target format (see below)")
    cv.add_argument("--name", help="name of the new entry (default: SOURCE-FORMAT)")
    cv.add_argument("--force", action="store_true",
                    help="convert again even if this entry was already converted to FORMAT (default: reuse it)")
    msub.add_parser("list", help="list registry entries as a tree (variants and adapters under their parent)")
    ld = msub.add_parser("load", help="make a running server serve a registered adapter (BASE:ADAPTER)")
    ld.add_argument("ref", help="BASE:ADAPTER, e.g. demo-tiny:homefire-answer")
    _server_flags(ld)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from homefire.serve.runner import ServeOptions, serve_forever

    return serve_forever(ServeOptions(
        config=args.config, host=args.host, port=args.port, proxy=args.proxy, address=args.address,
        num_cpus=args.num_cpus, num_gpus=args.num_gpus, detach=args.detach, verbose=args.verbose,
    ))


def cmd_plan(args: argparse.Namespace) -> int:
    from homefire.serve.plan import PlanOptions, run_plan

    return run_plan(PlanOptions(config=args.config, gpus=tuple(args.gpu), workload=args.workload, prices=args.prices,
                                as_json=args.json))


def cmd_status(args: argparse.Namespace) -> int:
    import ray

    from homefire.serve.status import app_status, format_status

    ray.init(address=args.address, logging_level="ERROR")
    st = app_status(args.app)
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
    return 0 if st["status"] != "NOT_RUNNING" else 1


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def cmd_tune(args: argparse.Namespace) -> int:
    from homefire.tune import load_tune_config, run_tune

    cfg = load_tune_config(args.config, _parse_overrides(args.set))  # a bad config fails before Ray starts
    rep = run_tune(cfg, address=args.address, resume=args.resume, verbose=args.verbose)
    print(f"\nreport: {rep.experiment_dir}/report.md   plot: {rep.experiment_dir}/pareto.png")
    if rep.best:
        print(f"best for {cfg.select.concurrency} stream(s): {rep.best}; serve it: homefire serve "
              f"{rep.summary['serve_config']}")
        return 0
    print(f"no winner: {rep.summary.get('why')}")
    return 1


def cmd_train(args: argparse.Namespace) -> int:
    from homefire.train import load_train_config, run_training

    overrides = _parse_overrides(args.set)
    if getattr(args, "distill", False):
        overrides = {"method": "distill", **overrides}
    cfg = load_train_config(args.config, overrides)  # a bad config fails before Ray starts
    report = run_training(cfg, address=args.address, resume=args.resume, verbose=args.verbose)
    print("\nrun summary:\n" + report.summary(), flush=True)
    print(f"report: {report.run_dir}/report.json   loss curve: {report.run_dir}/loss_curve.png")
    if report.status != "finished":
        return 1
    if args.serve:
        if cfg.method != "lora" or cfg.output.merge or not report.entry:
            raise ConfigError("--serve loads LoRA adapters into a running server; this run made a full model. "
                              f"Fix: serve it with a config whose source is {report.entry}")
        _load_adapter(args.url, report.entry, args.api_key)
    elif report.entry and ":" in report.entry:
        print(f"serve it: homefire models load {report.entry}   (or send model=\"{report.entry}\" to a running server)")
    return 0


def _load_adapter(url: str, ref: str, api_key: str | None) -> None:
    """POST /v1/load_lora_adapter on a running homefire server; bounded wait."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url.rstrip("/") + "/v1/load_lora_adapter", data=json.dumps({"lora_name": ref}).encode(), method="POST",
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=constants.ADAPTER_LOAD_TIMEOUT_S + 30) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ConfigError(f"the server at {url} refused to load {ref}: HTTP {err.code}: {detail}") from None
    except OSError as err:
        raise ConfigError(f"no homefire server answered at {url} ({err}). Fix: start one with `homefire serve`, "
                          "or pass --url") from None
    print(f"serving {body.get('model', ref)} at {url}/v1 (model=\"{ref}\")", flush=True)


def _print_tree(entries: list) -> None:
    """Entries under their parents: base models, then their versions' variants and adapters, indented."""
    refs = {e.ref for e in entries}
    children: dict[str | None, list] = {}
    for e in entries:
        children.setdefault(e.parent if e.parent in refs else None, []).append(e)

    def show(e, depth: int) -> None:
        root = Path(e.path)
        size = sum((root / f).stat().st_size for f in e.files if (root / f).is_file())
        extra = f"{size / 1e6:.1f} MB" if size else ""
        origin = "" if e.parent is None or e.parent in refs else f"from {e.parent}"
        print(f"{'  ' * depth}{e.ref:<{30 - 2 * depth}} {e.kind:<10} {e.format:<19} {extra:<9} {origin}".rstrip())
        for c in children.get(e.ref, []):
            show(c, depth + 1)

    print(f"{'ENTRY':<30} {'KIND':<10} {'FORMAT':<19} SIZE")
    for e in children.get(None, []):
        show(e, 0)


def cmd_models(args: argparse.Namespace) -> int:
    from homefire.registry import Registry

    reg = Registry()
    if args.models_command == "list":
        entries = reg.list()
        if not entries:
            print(f"registry {reg.uri} is empty; run `homefire models build`")
        else:
            _print_tree(entries)
        return 0
    if args.models_command == "convert":
        from homefire.convert import convert

        print(f"converting {args.source} to {args.to} ...", flush=True)
        e = convert(args.source, args.to, reg, name=args.name, force=args.force)
        print(f"{e.ref}  ({e.format}, {e.metrics['size_bytes'] / 1e6:.1f} MB, {e.metrics['convert_s']:.0f}s)  {e.path}")
        return 0
    if args.models_command == "load":
        if ":" not in args.ref:
            raise ConfigError(f"'{args.ref}' names no adapter. Fix: use BASE:ADAPTER, e.g. demo-tiny:homefire-answer")
        _load_adapter(args.url, args.ref, args.api_key)
        return 0
    if args.models_command == "build-demo":
        from homefire.models.pretrain import DEMO_PRETRAIN, ensure_pretrained

        for name in args.names or list(DEMO_PRETRAIN):
            if name not in DEMO_PRETRAIN:
                raise ConfigError(f"unknown demo model '{name}'. Fix: use one of {', '.join(DEMO_PRETRAIN)}")
            e = ensure_pretrained(name, reg, address=args.address, verbose=args.verbose)
            ppl = e.metrics.get("eval_after", {}).get("perplexity")
            print(f"{e.ref:<24} held-out perplexity {ppl}   {e.path}")
        return 0
    from homefire.models.build import DEMO_RECIPES, ensure_model

    names = args.names or list(DEMO_RECIPES)
    for name in names:
        if name not in DEMO_RECIPES:
            raise ConfigError(f"unknown demo model '{name}'. Fix: use one of {', '.join(DEMO_RECIPES)}")
        e = ensure_model(DEMO_RECIPES[name], reg)
        print(f"{e.ref:<24} {e.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler: dict[str, Any] = {
        "serve": cmd_serve, "status": cmd_status, "plan": cmd_plan, "train": cmd_train, "distill": cmd_train, "tune": cmd_tune, "models": cmd_models,
    }
    try:
        return handler[args.command](args)
    except HomefireError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
