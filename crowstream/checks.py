"""Argument checks shared by the pipeline and the readers: one message style for a bad
integer or choice (what was given, what is accepted)."""

from __future__ import annotations

import numbers

from crowstream.errors import ConfigError


def looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (./x, /x, ~/x, a/b/c) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def check_positive(name: str, value, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
