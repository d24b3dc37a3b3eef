"""Where a config comes from, read as hostile input: preset names, the YAML they hold, and how a bad one is told.

A deployment's `preset` and `overrides` are typed by anyone who can use the Prefect UI, and its errors land in
flow-run logs everyone can read. So:

- A preset is a name of a file in `config/` (`tiny`: no path separators, no `..`), or a path to a YAML file inside
  a directory the operator of the worker allowed: `config/` and those listed in `PRETRAIN_CONFIG_PATH`. Symlinks
  are resolved first; anything else is refused, naming the allowed places. Model presets (`model.preset`) follow
  the same rule with `config/models/`.
- YAML is read with PyYAML's safe loader plus one fix: YAML 1.1 reads `3e-4` as a string (its floats need a dot),
  which strict numbers would then reject; here it is the float it looks like, as in YAML 1.2.
- A validation error names the file, the dotted field, what was expected, and whether an override or the preset
  set it. It shows the value given only when that value cannot be a credential: never a value under `storage`,
  never one under an unknown key (a mistyped `secret_acess_key` is exactly how a secret leaks), never a mapping or
  a list (which may hold either), and never a URL's user-info. An unknown key gets the section's known fields and
  the closest match instead.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

CONFIG_PATH_ENV = "PRETRAIN_CONFIG_PATH"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.ya?ml)?$")
SHOWN_CHARS = 120  # of a value echoed in an error
# What is never echoed: any field of these sections (credentials, endpoints, the block's name).
SECRET_SECTIONS = ("storage",)


class ConfigError(ValueError):
    """A configuration problem, named by file and field, raised before any work starts."""


def allowed_dirs(home: Path) -> list[Path]:
    extra = [Path(p) for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p.strip()]
    return [home.resolve(), *(p.resolve() for p in extra)]


def resolve(preset: str | Path, home: Path, what: str = "config preset") -> Path:
    """The YAML file a preset names: `home/<name>.yaml` for a bare name, else a path inside an allowed directory."""
    text = str(preset)
    allowed = allowed_dirs(home)
    if NAME.match(text):
        path = home / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
    elif Path(text).suffix in (".yaml", ".yml") and ".." not in Path(text).parts:
        path = Path(text)
    else:
        raise ConfigError(
            f"{what} {text!r}: give the name of a YAML file in {home} (letters, digits, '-', '_'), or a path to a "
            f"YAML file inside {_places(allowed)}"
        )
    real = path.resolve()
    if not any(real.is_relative_to(d) for d in allowed):
        raise ConfigError(f"{what} {text!r}: {real} is outside the allowed places: {_places(allowed)}")
    if not real.is_file():
        known = ", ".join(sorted(p.stem for p in home.glob("*.yaml")))
        raise ConfigError(f"{what} {text!r}: no such file {path} (known in {home}: {known})")
    return real


def _places(allowed: list[Path]) -> str:
    return ", ".join(str(d) for d in allowed) + f" (the operator adds more with {CONFIG_PATH_ENV}=dir1{os.pathsep}dir2)"


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-3` and `3E+4` as floats (YAML 1.2) instead of strings (YAML 1.1)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """YAML, or a ConfigError naming the line and column: never PyYAML's own message, which quotes the line."""
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{where}: not valid YAML: {at}{problem}") from None


def describe(exc: ValidationError, model: type[BaseModel], source: str, overridden: set[str]) -> ConfigError:
    """One line per problem: `<file>: <field>: <what was expected> (<override or preset>[, got <value>])`."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "<root>"
        origin = "override" if any(_related(field, key) for key in overridden) else "preset"
        if err["type"] == "extra_forbidden":
            message = _unknown_field(model, loc)
        else:
            message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{source}: {field}: {message} ({origin}{_shown(err, loc)})")
    return ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _related(field: str, key: str) -> bool:
    return field == key or field.startswith(key + ".") or key.startswith(field + ".")


def _shown(err: dict, loc: tuple) -> str:
    if err["type"] == "extra_forbidden" or (loc and loc[0] in SECRET_SECTIONS) or "input" not in err:
        return ""
    value = err["input"]
    if isinstance(value, dict):  # (a section's own check: its message says what is wrong)
        return ""
    if isinstance(value, (list, tuple)):
        return f", got a list of {len(value)}"
    if isinstance(value, str):
        value = redact_url(value)
        if len(value) > SHOWN_CHARS:
            return f", got a string of {len(value)} characters"
    return f", got {value!r}"


USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact_url(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host`, anywhere in `text`."""
    return USERINFO.sub(r"\g<scheme>***@", text)


def _unknown_field(model: type[BaseModel], loc: tuple) -> str:
    section = _model_at(model, loc[:-1])
    if section is None:
        return "unknown field"
    known = sorted(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field (expected one of: {', '.join(known)}){hint}"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model of the section at `loc` (list indices and dict keys stepped over), if any."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
        current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """`X | None`, `list[X]`, `dict[str, X]`, `Annotated[X, ...]` -> X (the model inside, if there is one)."""
    for _ in range(4):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        origin = typing.get_origin(annotation)
        if origin is None or not args:
            return annotation
        if origin in (typing.Union, types.UnionType):
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else args[0]
        else:
            annotation = args[-1] if origin is dict else args[0]
    return annotation
