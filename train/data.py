"""Training data: local files -> rows -> the tokenizer's chat template -> tokens, loss on the answers only.

Row shapes (``data.format: auto`` decides per row):

* chat: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``
* instruction: ``{"instruction": "...", "input": "...", "output": "..."}`` or ``{"prompt": "...", "completion": "..."}``
* text: ``{"text": "..."}`` — every token is a target; documents are packed into ``max_length`` blocks.

Every problem is reported with its file and line before a worker starts.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homefire.errors import ConfigError

IGNORE_INDEX = -100
_EXTS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DataError(ConfigError):
    """A data file or row is unusable; the message names the file and line and says what to do."""


@dataclass
class Row:
    where: str  # "file:line" (1-based), or "file:row N" for columnar formats
    data: dict[str, Any]


@dataclass
class PreparedData:
    """Tokenized splits (Arrow tables with ``input_ids`` and ``labels``) and what a report needs."""

    train: Any
    eval: Any
    eval_examples: list[dict[str, Any]]  # {"messages": prompt messages, "reference": answer} for exact match
    stats: dict[str, Any] = field(default_factory=dict)
    data_hash: str = ""


def _files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in _EXTS)
        if not files:
            raise DataError(f"{p}: no data files ({', '.join(_EXTS)}) in this directory")
        return files
    if not p.is_file():
        raise DataError(f"data file {p} does not exist. Fix: check data.train / data.eval in the config")
    if p.suffix not in _EXTS:
        raise DataError(f"{p}: unknown data file type '{p.suffix}'. Fix: use one of {', '.join(_EXTS)}")
    return [p]


#: Text that ships with Python itself, usable as ``data.train`` anywhere (no download): pydoc's topic help.
BUILTIN_PYDOC = "builtin:pydoc-topics"


def read_rows(path: str) -> list[Row]:
    """Read every row of a file (or directory of files); JSON Lines are parsed here so errors name the line.

    ``builtin:pydoc-topics`` is the English prose that ships with CPython, one row per topic (the demo models'
    pretraining text; calibration and distillation data that needs no download)."""
    if path == BUILTIN_PYDOC:
        from homefire.models.pretrain import corpus_rows

        return corpus_rows()
    rows: list[Row] = []
    for f in _files(path):
        if f.suffix == ".jsonl" or (f.suffix == ".json" and not f.read_text(errors="replace").lstrip().startswith("[")):
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{f}:{n}: not valid JSON ({err.msg} at column {err.colno}). Fix: one JSON object per line") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{f}:{n}: expected a JSON object, got {type(obj).__name__}")
                    rows.append(Row(f"{f}:{n}", obj))
        elif f.suffix == ".json":
            try:
                items = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DataError(f"{f}:{err.lineno}: not valid JSON ({err.msg})") from None
            for n, obj in enumerate(items):
                if not isinstance(obj, dict):
                    raise DataError(f"{f}: item {n}: expected a JSON object, got {type(obj).__name__}")
                rows.append(Row(f"{f}: item {n}", obj))
        elif f.suffix == ".txt":
            text = f.read_text(encoding="utf-8")
            rows += [Row(f"{f}: paragraph {n}", {"text": t}) for n, t in enumerate(text.split("\n\n")) if t.strip()]
        else:  # csv / parquet through `datasets`, which reads any local file it knows
            from datasets import load_dataset

            ds = load_dataset(_EXTS[f.suffix], data_files=str(f), split="train")
            rows += [Row(f"{f}: row {n + 2 if f.suffix == '.csv' else n}", dict(r)) for n, r in enumerate(ds)]
    return rows


def row_format(row: Row, wanted: str) -> str:
    d = row.data
    fmt = wanted
    if wanted == "auto":
        if "messages" in d:
            fmt = "chat"
        elif ("instruction" in d and "output" in d) or ("prompt" in d and "completion" in d):
            fmt = "instruction"
        elif "text" in d:
            fmt = "text"
        else:
            raise DataError(
                f"{row.where}: row has keys {sorted(d)}; expected 'messages', 'instruction'+'output', "
                "'prompt'+'completion' or 'text'. Fix: rename the fields or set data.format"
            )
    return fmt


def to_messages(row: Row, fmt: str) -> list[dict[str, str]]:
    """A chat or instruction row as chat messages; the last one is the assistant's answer."""
    d = row.data
    if fmt == "chat":
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{row.where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
                raise DataError(
                    f"{row.where}: messages[{i}] must be {{\"role\": system|user|assistant, \"content\": string}}, got {m!r:.80}"
                )
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{row.where}: the last message must be the assistant's answer (role 'assistant')")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    prompt = d.get("instruction", d.get("prompt"))
    answer = d.get("output", d.get("completion"))
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise DataError(f"{row.where}: 'instruction'/'prompt' and 'output'/'completion' must be strings")
    if d.get("input"):
        prompt = f"{prompt}\n\n{d['input']}"
    msgs = [{"role": "system", "content": d["system"]}] if isinstance(d.get("system"), str) else []
    return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def encode_chat(messages: list[dict[str, str]], tokenizer, max_length: int) -> tuple[list[int], list[int], bool]:
    """Token ids and labels for a conversation: only assistant turns are targets.

    Each turn is rendered by the tokenizer's own chat template; the text a turn adds is encoded
    on its own, so the prompt tokens equal what a server encodes before generating the answer.
    """
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            part = prefix[len(rendered):]
            ids += tokenizer.encode(part, add_special_tokens=False)
            labels += [IGNORE_INDEX] * (len(ids) - len(labels))
            rendered = prefix
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(rendered):
            raise DataError("the tokenizer's chat template does not render conversations incrementally")
        new = tokenizer.encode(full[len(rendered):], add_special_tokens=False)
        ids += new
        labels += new if m["role"] == "assistant" else [IGNORE_INDEX] * len(new)
        rendered = full
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def _table(examples: list[tuple[list[int], list[int]]]):
    import pyarrow as pa

    return pa.table({
        "input_ids": pa.array([e[0] for e in examples], type=pa.list_(pa.int32())),
        "labels": pa.array([e[1] for e in examples], type=pa.list_(pa.int32())),
    })


def _pack(docs: list[list[int]], max_length: int) -> list[tuple[list[int], list[int]]]:
    stream = [t for d in docs for t in d]
    blocks = [stream[i : i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
    return [(b, b) for b in blocks]


def _encode_rows(rows: list[Row], fmt: str, tokenizer, max_length: int, stats: dict) -> tuple[list, list]:
    examples, docs, raw = [], [], []
    for row in rows:
        f = row_format(row, fmt)
        if f == "text":
            if not isinstance(row.data.get("text"), str):
                raise DataError(f"{row.where}: 'text' must be a string")
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            docs.append(bos + tokenizer.encode(row.data["text"], add_special_tokens=False) + eos)
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{row.where}: {f} rows need the tokenizer's chat template, and this tokenizer has none. "
                "Fix: use a chat/instruct model (or add a chat_template to its tokenizer_config.json), or text rows"
            )
        msgs = to_messages(row, f)
        ids, labels, truncated = encode_chat(msgs, tokenizer, max_length)
        stats["truncated"] += truncated
        if all(label == IGNORE_INDEX for label in labels):
            stats["dropped_no_target"] += 1
            continue
        examples.append((ids, labels))
        raw.append({"messages": msgs[:-1], "reference": msgs[-1]["content"], "where": row.where})
    stats["packed_tokens"] += sum(len(d) for d in docs)
    examples += _pack(docs, max_length)
    return examples, raw


def _hash_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in _files(p):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def prepare_data(spec, tokenizer, rows: list[Row] | None = None, eval_rows: list[Row] | None = None) -> PreparedData:
    """Read, validate, tokenize and split the data named by ``spec`` (a :class:`DataSpec`).

    Raises:
        DataError: naming the file and line of a bad row, an empty dataset, or a template-less tokenizer.
    """
    rows = read_rows(spec.train) if rows is None else rows
    if not rows:
        raise DataError(f"{spec.train}: the dataset is empty. Fix: add rows (one JSON object per line)")
    if eval_rows is None and spec.eval:
        eval_rows = read_rows(spec.eval)
    if eval_rows is None and spec.eval_fraction > 0:
        shuffled = rows[:]
        random.Random(spec.seed).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * spec.eval_fraction)) if len(shuffled) > 1 else 0
        eval_rows, rows = shuffled[:n_eval], shuffled[n_eval:]
    stats = {"truncated": 0, "dropped_no_target": 0, "packed_tokens": 0, "max_length": spec.max_length}
    train, _ = _encode_rows(rows, spec.format, tokenizer, spec.max_length, stats)
    ev, raw_eval = _encode_rows(eval_rows or [], spec.format, tokenizer, spec.max_length, stats)
    if not train:
        raise DataError(
            f"{spec.train}: no training examples after tokenization ({len(rows)} rows; {stats['dropped_no_target']} had "
            f"no answer tokens left within max_length {spec.max_length}). Fix: raise data.max_length or add rows"
        )
    random.Random(spec.seed).shuffle(train)
    stats.update(
        train_rows=len(rows), eval_rows=len(eval_rows or []), train_examples=len(train), eval_examples=len(ev),
        train_tokens=sum(len(e[0]) for e in train), target_tokens=sum(sum(t != IGNORE_INDEX for t in e[1]) for e in train),
    )
    paths = [spec.train] + ([spec.eval] if spec.eval else [])
    data_hash = _hash_files(paths) if all(Path(p).exists() for p in paths) else hashlib.sha256(
        json.dumps([r.data for r in rows], sort_keys=True).encode()).hexdigest()
    return PreparedData(_table(train), _table(ev), raw_eval, stats, data_hash)


def pad_batch(batch: dict, pad_id: int):
    """Right-pad a batch of ``input_ids``/``labels`` lists into tensors with an attention mask."""
    import torch

    ids, labels = list(batch["input_ids"]), list(batch["labels"])
    width = max(len(x) for x in ids)
    out_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    out_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        out_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        out_labels[i, : len(y)] = torch.tensor(y, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": out_ids, "labels": out_labels, "attention_mask": mask}


__all__ = ["DataError", "IGNORE_INDEX", "PreparedData", "Row", "encode_chat", "pad_batch", "prepare_data", "read_rows"]
