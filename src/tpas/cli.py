"""Build click commands from typed config dataclasses.

Each script declares one dataclass; every field becomes a `--flag` with the field's
`help` metadata, so `--help` always lists every option and the resolved config that is
saved beside the outputs is exactly what ran.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from tpas.errors import TpasError
from tpas.io import read_json

T = TypeVar("T")


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its CLI help text."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _option_for(f: dataclasses.Field, tp: Any) -> Callable:
    meta = dict(f.metadata)
    help_text = meta.pop("help", "")
    choices = meta.pop("choices", None)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    base, _ = _strip_optional(tp)
    origin = typing.get_origin(base)
    if base is bool:
        return click.option(
            f"{_flag(f.name)}/--no-{f.name.replace('_', '-')}", default=default, show_default=True, help=help_text
        )
    if origin is tuple:
        inner = typing.get_args(base)
        return click.option(_flag(f.name), type=tuple(inner), default=default, show_default=True, help=help_text)
    if origin is list:
        (inner,) = typing.get_args(base)
        return click.option(
            _flag(f.name), type=inner, multiple=True, default=tuple(default or ()), show_default=True, help=help_text
        )
    if choices:
        ptype: Any = click.Choice(choices)
    elif base is Path:
        ptype = click.Path(path_type=Path)
    else:
        ptype = base
    return click.option(_flag(f.name), type=ptype, default=default, show_default=default is not None, help=help_text)


GIVEN_ATTR = "_given_flags"  # set on a config built from a command line: the fields given there


def given_fields(config: Any) -> set[str]:
    """The fields of `config` its user set: the flags given on the command line when it came from
    one (click's parameter source), else (built in Python) those that differ from the defaults."""
    given = getattr(config, GIVEN_ATTR, None)
    if given is not None:
        return set(given)
    defaults = type(config)()
    return {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(defaults, f.name)}


def with_given(config: T, given: set[str]) -> T:
    """Mark which fields of `config` were given (see given_fields); returns config."""
    object.__setattr__(config, GIVEN_ATTR, frozenset(given))
    return config


def config_command(config_cls: type[T], help: str) -> Callable[[Callable[[T], Any]], click.Command]:
    """Decorator: turn `fn(config)` into a click command whose options are the config's fields."""
    hints = typing.get_type_hints(config_cls)

    def decorate(fn: Callable[[T], Any]) -> click.Command:
        def callback(config_file: Path | None = None, **kwargs: Any) -> None:
            context = click.get_current_context()
            values, given = {}, set()
            for f in dataclasses.fields(config_cls):  # type: ignore[arg-type]
                value = kwargs[f.name]
                if typing.get_origin(_strip_optional(hints[f.name])[0]) is list:
                    value = list(value)
                values[f.name] = value
                if context.get_parameter_source(f.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
                    given.add(f.name)

            def build() -> T:
                # built inside the handler: a bad value (a TpasError from __post_init__) is one sentence too
                if config_file is not None:
                    replayed = {k: v for k, v in replay(config_file, config_cls).items() if k not in given}
                    values.update(replayed)
                    given.update(replayed)
                return with_given(config_cls(**values), given)

            run_cli(lambda: fn(build()))

        command = callback
        for f in reversed(dataclasses.fields(config_cls)):  # type: ignore[arg-type]
            command = _option_for(f, hints[f.name])(command)
        command = click.option(
            "--config",
            "config_file",
            type=click.Path(path_type=Path),
            default=None,
            help="Replay a saved config (a stage's *_config.json, or a run's config.json): its "
            "value for every flag not given on this command line.",
        )(command)
        return click.command(help=help, context_settings={"show_default": True})(command)

    return decorate


def replay(path: Path, config_cls: type) -> dict[str, Any]:
    """The settings of `config_cls` saved in `path` (a dataclass written by tpas.io.write_json, or a
    run's config.json, whose "train" part is train.py's), typed back (paths, tuples, lists)."""
    data = read_json(path)
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    if isinstance(data, dict) and isinstance(data.get("train"), dict) and "train" not in known:
        data = data["train"]
    if not isinstance(data, dict) or not set(data) & set(known):
        raise TpasError(
            f"{path}: holds none of this command's settings; pass the *_config.json this command wrote "
            f"(or a run's config.json for train.py)."
        )
    hints = typing.get_type_hints(config_cls)
    out = {}
    for name, value in data.items():
        if name not in known:
            continue
        base, _ = _strip_optional(hints[name])
        if value is not None:
            if base is Path:
                value = Path(value)
            elif typing.get_origin(base) is tuple:
                value = tuple(value)
            elif typing.get_origin(base) is list:
                value = list(value)
        out[name] = value
    return out


def run_cli(action: Callable[[], Any]) -> Any:
    """Run a stage; a TpasError becomes one line on stderr and exit code 2, no traceback."""
    try:
        return action()
    except TpasError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
