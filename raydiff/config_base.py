"""Shared machinery for raydiff's typed configs.

Every component defines its own `Section` subclass next to the code that uses
it; this module only holds what they share: strict parsing (unknown keys are
errors), error messages that name the field path and suggest the closest valid
name, YAML loading and `key.sub=value` overrides.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the field and the fix."""


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _model_at(model_cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Walk `loc` through nested Section types to find the model that owns the last key."""
    cls: Any = model_cls
    for part in loc[:-1]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            cls = _union_member(cls, part)
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # list index: stay on the current class
        ann = field.annotation
        cls = _unwrap(ann) if _union_member(ann, None) is None else ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _union_member(annotation: Any, tag: Any) -> Any:
    """For a tagged union of Sections, the member whose `name` default equals `tag` (None: is it a union?)."""
    members = [a for a in (getattr(annotation, "__args__", ()) or ()) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(members) < 2 and not (members and "name" in members[0].model_fields):
        return None
    if tag is None:
        return members
    for m in members:
        f = m.model_fields.get("name")
        if f is not None and f.default == tag:
            return m
    return None


def _unwrap(annotation: Any) -> Any:
    """Return the Section class inside Optional[...] / Annotated[...] when there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def format_validation_error(err: ValidationError, root: type[BaseModel]) -> str:
    """Turn pydantic's error list into lines like `sampling.num_step: unknown key (did you mean 'num_steps'?)`."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            owner = _model_at(root, loc)
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            lines.append(f"{path}: unknown key{hint}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"{path}: {e['msg']} (got {got_s} of type {type(got).__name__})")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a','b','c'], value); the value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part; write e.g. sampling.num_steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set `data[path[0]]...[path[-1]] = value`, creating intermediate mappings."""
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is a value, not a section")
        node = nxt
    node[path[-1]] = value


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; an empty file is an empty mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a path such as configs/tiny_ddpo.yaml")
    with p.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def build(model_cls: type[BaseModel], data: dict) -> Any:
    """Validate `data` into `model_cls`, raising ConfigError with field paths on failure."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model_cls)) from None


def undocumented_fields(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Field paths without a description (a test keeps this empty: every field has a one-line doc)."""
    missing = []
    for name, field in model_cls.model_fields.items():
        path = f"{prefix}{name}"
        if not field.description:
            missing.append(path)
        sub = _unwrap(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            missing += undocumented_fields(sub, path + ".")
    return missing
