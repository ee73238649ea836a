"""Task scores: greedy answers to a small task set compared with references. One module for every caller:
``homefire train`` scores the base model and the trained one on transformers; ``homefire tune`` scores every variant
on the engine that would serve it. Each caller brings its own ``generate``; the task format, the matching and the
score are here.

A task file is JSON Lines, one example per line: ``{"prompt": "...", "reference": "..."}`` (a completion: the
prompt's tokens as they are) or ``{"messages": [...], "reference": "..."}`` (a chat, through the model's template).
``match: exact`` compares the whole answer with the reference; ``prefix`` asks that the answer start with it (cloze
tasks: the next word). Both compare lower-cased text with whitespace collapsed.

Shipped task: ``builtin:pydoc-cloze`` (``tune/data/tasks/pydoc-cloze.jsonl``): 128 passages of the English text that
ships with Python (pydoc's topic help, 60-240 characters from a sentence start, spread evenly over every topic), each
cut before a lower-case word of 4+ letters the model should continue with (prefix match). It is what a model pretrained
on that text remembers (the pretrained demo model: ~10 %; its random-init build: ~1 %), and what quantization, pruning
and distillation keep of it; for your own model, point ``eval.task`` at a task of your domain.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from homefire.errors import ConfigError

#: Shipped tasks (in the homefire.tune package's data).
BUILTIN_TASKS = {"builtin:pydoc-cloze": "pydoc-cloze.jsonl"}
Match = Literal["exact", "prefix"]


@dataclass(frozen=True)
class Example:
    """One task item: a completion ``prompt`` or chat ``messages``, and the ``reference`` answer."""

    reference: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    where: str = ""


def task_path(name: str) -> Path:
    """The file of task ``name`` (a builtin: name, or a path)."""
    if name in BUILTIN_TASKS:
        import importlib.util

        tune_dir = Path(importlib.util.find_spec("homefire.tune").origin).parent
        return tune_dir / "data" / "tasks" / BUILTIN_TASKS[name]
    return Path(name).expanduser()


def load_task(name: str) -> list[Example]:
    """Read a task file; ConfigError naming the file and line of a bad example."""
    path = task_path(name)
    if not path.is_file():
        raise ConfigError(f"task {name}: {path} is not a file. Fix: a JSONL file of {{prompt|messages, reference}} "
                          f"examples, or one of {', '.join(BUILTIN_TASKS)}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err.msg}). Fix: one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("reference"), str) or (
                not isinstance(row.get("prompt"), str) and not isinstance(row.get("messages"), list)):
            raise ConfigError(f"{where}: expected {{\"prompt\": str | \"messages\": [...], \"reference\": str}}")
        out.append(Example(row["reference"], row.get("prompt"), row.get("messages"), where))
    if not out:
        raise ConfigError(f"task {name}: {path} has no examples")
    return out


def normalize(text: str) -> str:
    return " ".join(text.strip().split()).lower()


def matches(answer: str, reference: str, match: Match = "exact") -> bool:
    a, r = normalize(answer), normalize(reference)
    return a == r if match == "exact" else a.startswith(r)


def score(examples: list[Example], generate: Callable[[Example], str], match: Match = "exact",
          samples: int = 3) -> dict[str, Any]:
    """The share of ``examples`` whose greedy answer (``generate(example)``) matches the reference, and a few samples."""
    return score_answers(examples, [generate(ex) for ex in examples], match, samples)


def score_answers(examples: list[Example], answers: list[str], match: Match = "exact",
                  samples: int = 3) -> dict[str, Any]:
    """:func:`score` for answers generated elsewhere (an async engine), in the order of ``examples``."""
    hits = [matches(a, ex.reference, match) for a, ex in zip(answers, examples, strict=True)]
    return {
        "score": sum(hits) / max(len(examples), 1), "n": len(examples), "match": match,
        "samples": [{"prompt": ex.prompt if ex.prompt is not None else ex.messages[-1]["content"],
                     "reference": ex.reference, "answer": a} for ex, a in zip(examples[:samples], answers[:samples])],
    }


__all__ = ["BUILTIN_TASKS", "Example", "load_task", "matches", "normalize", "score", "score_answers", "task_path"]
