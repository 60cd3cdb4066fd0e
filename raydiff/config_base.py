"""Shared machinery for raydiff's typed configs.

Every component defines its own `Section` subclass next to the code that uses
it; this module only holds what they share: strict parsing (unknown keys are
errors), error messages that name the field path and suggest the closest valid
name, YAML loading and `key.sub=value` overrides.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the field and the fix."""


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _sections_in(annotation: Any) -> list:
    """Section classes inside an annotation (through Optional / Union / Annotated / list[...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is Annotated:
        return _sections_in(get_args(annotation)[0])
    out = []
    for arg in getattr(annotation, "__args__", ()) or ():
        out += _sections_in(arg)
    return out


def _model_at(model_cls: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, tuple]:
    """Walk `loc` through nested Section types: (model that owns the last key, loc without union tags).

    A tagged union of Sections (e.g. `algorithm`, tagged by `name`) puts its tag in pydantic's
    error location (`algorithm.ddpo.clip_rnge`); users write `algorithm.clip_rnge`, so the tag
    is dropped from the shown path and selects the member class.
    """
    cls: Any = model_cls
    members: list | None = None
    shown: list = []
    for part in loc[:-1]:
        if members is not None:  # the previous key was a tagged union: this part is its tag
            pick = next((m for m in members if m.model_fields["name"].default == part), None)
            members = None
            if pick is not None:
                cls = pick
                continue
        shown.append(part)
        if cls is None:
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # list index: stay on the current class
        secs = _sections_in(field.annotation)
        if len(secs) > 1 and all("name" in m.model_fields for m in secs):
            cls, members = None, secs
        else:
            cls = secs[0] if len(secs) == 1 else None
    owner = cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None
    return owner, tuple(shown) + tuple(loc[-1:])


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
        owner, loc = _model_at(root, tuple(e["loc"]))
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
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
