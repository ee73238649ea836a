"""Typed config models shared by every verb, and the one loader that reports errors well.

Every config is a pydantic model with ``extra="forbid"``: an unknown key is refused with
its path and the keys that are allowed there.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from homefire.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSpec(StrictModel):
    """Where a model's weights come from and how to load them; shared by serve, train and tune."""

    source: str = Field(
        description="A registry entry (`demo`, `demo@2`), a local directory, or a hub id (`org/name`).",
        min_length=1,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/activations dtype; `auto` is float32 on CPU and the checkpoint's on GPU."
    )
    max_model_len: int | None = Field(
        None, ge=16, le=1_048_576, description="Context length in tokens; default: the model's own."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust the model's source."
    )


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation can hold (through Optional, list, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()) or ():
        found += [m for m in _models_in(arg) if m not in found]
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and not found:
        found = _models_in(origin) if isinstance(origin, type) else []
    return found


def _is_tag(model: type[BaseModel], value: str) -> bool:
    """Whether ``value`` is the discriminator tag of ``model`` (a Literal field that allows only it)."""
    for f in model.model_fields.values():
        if getattr(f.annotation, "__origin__", None) is Literal and f.annotation.__args__ == (value,):
            return True
    return False


def _walk(model: type[BaseModel], loc: tuple) -> tuple[tuple, list[str]]:
    """Follow ``loc`` through nested models: (loc without union tags, the keys allowed at its last parent)."""
    current: list[type[BaseModel]] = [model]
    shown: list = []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int):
            shown.append(part)
            continue
        tagged = [m for m in current if len(current) > 1 and _is_tag(m, part)]
        if tagged:
            current = tagged  # a discriminated union's tag: pydantic puts it in the path, users never write it
            continue
        shown.append(part)
        if last:
            break
        fields = [m.model_fields[part] for m in current if part in m.model_fields]
        current = _models_in(fields[0].annotation) if fields else []
    allowed = sorted({k for m in current for k in m.model_fields}) if len(current) == 1 else []
    return tuple(shown), allowed


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem: ``key: what is wrong (got X). Fix: ...``."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc, allowed = _walk(model, tuple(e["loc"]))
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            lines.append(f"  {key}: unknown key. Fix: {hint}allowed keys here: {', '.join(allowed)}")
        elif e["type"] == "invalid_engine":
            got = e["input"].get("engine") if isinstance(e["input"], dict) else e["input"]
            lines.append(f"  {key}.engine: {got!r} is not an engine. Fix: {e['msg'].split('; ')[-1]}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing. Fix: add '{loc[-1]}'")
        elif e["type"] == "value_error" and "fix:" in e["msg"].lower():  # our own checks already say the fix
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {msg}" if not loc else f"  {key}: {msg}")  # a check of the whole file names its key
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"  {key}: {e['msg']} (got {got_s[:80]}). Fix: change '{key}'")
    return "\n".join(lines)


def validate_config(model: type[M], data: Any, source: str = "<config>") -> M:
    """Validate ``data`` against ``model``; raise :class:`ConfigError` naming each bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file, turning parse errors into a ConfigError with line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Fix: pass the path of a YAML file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None


def apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    """Set dotted keys (``{"optim.lr": 1e-4}``, what ``--set`` gives) in a loaded config mapping, in place."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


def load_config(model: type[M], path: str | Path) -> M:
    """Load and validate a YAML config file."""
    return validate_config(model, load_yaml(path), str(path))
