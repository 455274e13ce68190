"""Settings as dataclass fields: one line gives a setting's default, help, check and command-line flag.

    @dataclass
    class Schedule:
        steps: int = setting(50_000, "optimizer steps in all", check=at_least(1))
        cosine: bool = setting(True, "then a cosine decay to the last step")

    add_flags(parser, Schedule)               # --steps N, --cosine/--no-cosine, help and default from the field
    Schedule(**given(args, Schedule))         # the flags the user gave; the others keep their defaults
    check_settings(schedule)                  # every field's check, in __post_init__; one line naming the fix

A field's type makes its flag: int and float take a value, a bool that is off is --name and one that is on
--name/--no-name, a Literal offers its values. A check returns what is wrong with a value (None: nothing).
Stdlib only: imported by every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field
from typing import Any, Callable, Literal

Check = Callable[[Any], "str | None"]


def setting(default: Any, help: str, check: Check | None = None, resumable: bool = False, flag: bool = True,
            metavar: str | None = None) -> Any:
    """A dataclass field that is a user's setting. `resumable`: a resumed run may change it (it does not change
    what is computed); `flag=False`: no generated flag (the command spells it by hand)."""
    return field(default=default, metadata=dict(help=help, check=check, resumable=resumable, flag=flag,
                                                 metavar=metavar))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def at_least(low: int) -> Check:
    """An integer >= low."""
    words = {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer of at least {low}")
    return lambda v: None if _is_int(v) and v >= low else f"must be {words}"


def positive(v) -> str | None:
    return None if _is_number(v) and v > 0 else "must be a positive number"


def not_negative(v) -> str | None:
    return None if _is_number(v) and v >= 0 else "must not be negative"


def fraction(v) -> str | None:
    return None if _is_number(v) and 0 <= v < 1 else "must be in [0, 1)"


def one_of(*values) -> Check:
    return lambda v: None if v in values else f"must be {', '.join(map(str, values[:-1]))} or {values[-1]}"


def _settings(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _flagged(cls) -> list[dataclasses.Field]:
    """The settings that have a generated flag: the command's own first, then inherited ones."""
    own = cls.__dict__.get("__annotations__", {})
    return sorted((f for f in _settings(cls) if f.metadata["flag"]), key=lambda f: f.name not in own)


def _base(kind):
    """`float | None` -> float; other types as they are."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(kind) and len(args) == 1 else kind


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(default) -> Any:
    """A default as help and the README show it: on/off for a bool."""
    return ("on" if default else "off") if isinstance(default, bool) else default


def described(f: dataclasses.Field) -> str:
    """A field's help with its default (unless the help says it, or there is none to say)."""
    text = f.metadata["help"]
    if f.default in (None, False, "") or "default" in text:
        return text
    return f"{text} (default {_shown(f.default)})"


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per setting of `cls` (flat name -> --flat-name); every default None, so that `given` sees only
    what the user typed."""
    hints = typing.get_type_hints(cls)
    for f in _flagged(cls):
        kind, opts = _base(hints[f.name]), dict(default=None, dest=f.name, help=described(f).replace("%", "%%"))
        if kind is bool and f.default is False:
            opts.update(action="store_const", const=True)
        elif kind is bool:
            opts["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            opts["choices"] = typing.get_args(kind)
        else:
            opts["type"] = kind
            opts["metavar"] = f.metadata["metavar"] or ("N" if kind is int else "X")
        parser.add_argument(flag_name(f.name), **opts)


def given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The settings of `cls` the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in _flagged(cls) if getattr(args, f.name, None) is not None}


def check_settings(obj, label: Callable[[str], str] = str) -> None:
    """Every setting's check (a Literal's values too); the first failure is a ValueError naming the setting by
    `label(name)` (e.g. flag_name), what it must be and what it got."""
    hints = typing.get_type_hints(type(obj))
    for f in _settings(type(obj)):
        value, kind = getattr(obj, f.name), _base(hints[f.name])
        checks = [f.metadata["check"]]
        if typing.get_origin(kind) is Literal:
            checks.append(one_of(*typing.get_args(kind)))
        for check in checks:
            problem = check(value) if check and not (value is None and hints[f.name] is not kind) else None
            if problem:
                raise ValueError(f"{label(f.name)} {problem}, got {value!r}")


def resumable(*classes) -> frozenset[str]:
    """Names of the settings a resumed run may change."""
    return frozenset(f.name for cls in classes for f in _settings(cls) if f.metadata["resumable"])


def settings_table(*classes) -> str:
    """A Markdown table of the settings' flags, defaults and help (the README's)."""
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for cls in classes:
        for f in _flagged(cls):
            default = "" if f.default in (None, "") else f"`{_shown(f.default)}`"
            rows.append(f"| `{flag_name(f.name)}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows)
