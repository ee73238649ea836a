"""Where the box's CPU goes: every process's share of one core over a window, from ``/proc`` (Linux).

    python benchmarks/cpu_by_process.py                  # 15 s window, every process over 0.5 % of a core
    python benchmarks/cpu_by_process.py --seconds 30 --min-percent 0.1 --json out.json

Reads each process's utime + stime (``/proc/PID/stat``) at the start and the end of the window and prints the
difference as a percentage of one core, largest first, with the process's title (Ray and vLLM name their
processes: ``ray::ServeController``, ``VLLM::EngineCore``, ...; a Python process shows its script or module). A
process that starts inside the window counts from its start; one that ends inside it is left out. The last line
is the total, against ``100 % x cores``. It starts nothing: run it beside a server under load (or idle) to see what
each part of the stack costs (``benchmarks/results/serve_profile.md`` has the readings).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
    return int(fields[11]) + int(fields[12])  # utime, stime


def _title(pid: str) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return f"[{comm}]"
    if args[0].startswith(("ray::", "VLLM::")) or "python" not in Path(args[0]).name:
        return " ".join(args)[:90]
    rest = args[1:]
    if rest[:1] == ["-m"] and len(rest) > 1:  # python -m module ...
        return f"python -m {rest[1]}"[:90]
    return (" ".join(Path(a).name if i == 0 else a for i, a in enumerate(rest)) or comm)[:90]


def sample(seconds: float) -> list[dict]:
    """Each process's CPU over ``seconds`` as ``{"pid", "title", "percent"}``, largest first."""
    before = {pid: t for pid in os.listdir("/proc") if pid.isdigit() and (t := _cpu_ticks(pid)) is not None}
    titles = {pid: _title(pid) for pid in before}
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    rows = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or (now := _cpu_ticks(pid)) is None:
            continue
        spent = now - before.get(pid, 0)
        title = titles.get(pid) or _title(pid)
        rows.append({"pid": int(pid), "title": title, "percent": 100.0 * spent / TICKS / elapsed})
    return sorted(rows, key=lambda r: -r["percent"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="length of the window (default 15)")
    p.add_argument("--min-percent", type=float, default=0.5, help="hide processes below this (default 0.5)")
    p.add_argument("--json", type=Path, help="also write every row to this file")
    args = p.parse_args(argv)
    rows = sample(args.seconds)
    cores = os.cpu_count() or 1
    for r in rows:
        if r["percent"] >= args.min_percent:
            print(f"{r['percent']:6.1f} %  {r['pid']:>7}  {r['title']}")
    total = sum(r["percent"] for r in rows)
    print(f"{total:6.1f} %  total of {100 * cores} % ({cores} cores), over {args.seconds:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "cores": cores, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
