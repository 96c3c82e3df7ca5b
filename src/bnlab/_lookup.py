"""One lookup for Keras-style specs: a name, an instance, a callable (or None where allowed)."""

from __future__ import annotations

from typing import Callable


def lookup(spec, table: dict[str, Callable], kind: str, allow_none: bool):
    """Resolve ``spec`` against ``table`` (name -> factory); errors name what was expected."""
    if spec is None and allow_none:
        return None
    if isinstance(spec, str):
        try:
            return table[spec.lower()]()
        except KeyError:
            raise ValueError(f"unknown {kind} {spec!r}; expected one of {sorted(table)}, an instance or a callable") from None
    if callable(spec):
        return spec
    expected = "None, a name" if allow_none else "a name"
    raise TypeError(f"a {kind} must be {expected}, an instance or a callable, got {spec!r}")
