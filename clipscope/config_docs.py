"""Render the configuration reference (docs/configuration.md) from the schema itself.

A test regenerates it and compares, so the reference can never drift from the code.
"""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from clipscope.config import RunConfig
from clipscope.settings import Settings


def _default(field) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()
        if isinstance(value, BaseModel):
            return "(table)"
        if isinstance(value, list):
            return ", ".join(f"{v.name}/{v.split}" if hasattr(v, "split") else repr(v) for v in value)
        return repr(value)
    if field.default is PydanticUndefined:
        return "(required)"
    if field.default is None:
        return "—"
    return f"`{field.default!r}`".replace("PosixPath", "Path")


def _model_of(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _table(model: type[BaseModel], prefix: str, out: list[str], seen: set[str]) -> None:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None and get_origin(field.annotation) is not list:
            nested.append((f"{prefix}{name}", sub, field))
            continue
        shown = name if sub is None else f"{name} (list of [{sub.__name__}](#{sub.__name__.lower()}))"
        rows.append(f"| `{shown}` | {_default(field)} | {field.description or ''} |")
        if sub is not None and sub.__name__ not in seen:
            nested.append((f"{prefix}{name}[]", sub, field))
    title = prefix.rstrip(".") or "top level"
    out += [f"### `[{title}]` — {model.__name__}", "", (model.__doc__ or "").strip(), ""]
    if rows:
        out += ["| key | default | meaning |", "| --- | --- | --- |", *rows, ""]
    for path, sub, field in nested:
        if sub.__name__ in seen:
            out += [f"### `[{path}]`", "", f"{field.description} A [{sub.__name__}](#{sub.__name__.lower()}) table.", ""]
            continue
        seen.add(sub.__name__)
        _table(sub, f"{path}.", out, seen)


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from `clipscope/config.py` and `clipscope/settings.py` by",
        "`python -m clipscope.config_docs > docs/configuration.md`; a test fails when it is stale.",
        "",
        "## Environment settings",
        "",
        "Where things live and what machine runs them: environment variables (or a `.env` file).",
        "",
        "| variable | default | meaning |",
        "| --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        out.append(f"| `CLIPSCOPE_{name.upper()}` | {_default(field)} | {field.description} |")
    out += ["", "## Run config (TOML)", "", (RunConfig.__doc__ or "").strip() + " Unknown keys are errors.",
            "", "Any key can also be set on the command line of every command that takes a config, without editing the file: "
            "`--set sae.k=64 --set train.epochs=1` (repeatable, the last wins; the value is TOML — a number, `true`, "
            "`[\"a photo of a {}.\"]` — or else text, as in `--set data.root=/data/food`; a list is set whole). A value "
            "changes the SAE's key as the file would, so a sweep is a loop of `clipscope run` with one `--set` each.", ""]
    _table(RunConfig, "", out, {"RunConfig"})
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
