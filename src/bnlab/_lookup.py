"""One lookup for Keras-style specs: a name, an instance, a callable, a config dict (or None where allowed)."""

from __future__ import annotations

from typing import Callable


class Spec:
    """Base of Keras-style objects made from their constructor arguments (initializers, regularizers,
    constraints): they keep each argument as an attribute of the same name."""

    def get_config(self) -> dict:
        """The constructor arguments (Keras' ``get_config``): ``type(self)(**self.get_config())`` rebuilds it."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def lookup(spec, table: dict[str, Callable], kind: str, allow_none: bool, classes: dict[str, type] | None = None):
    """Resolve ``spec`` against ``table`` (name -> factory); errors name what was expected.

    A dict ``{"class_name": ..., "config": {...}}`` (what :func:`serialize`
    writes, Keras' format) builds ``classes[class_name](**config)``.
    """
    if spec is None and allow_none:
        return None
    if isinstance(spec, str):
        try:
            return table[spec.lower()]()
        except KeyError:
            raise ValueError(f"unknown {kind} {spec!r}; expected one of {sorted(table)}, an instance or a callable") from None
    if isinstance(spec, dict) and classes is not None:
        name, config = spec.get("class_name"), spec.get("config", {})
        if name not in classes or not isinstance(config, dict) or set(spec) - {"class_name", "config"}:
            raise ValueError(f"a {kind} config must be {{'class_name': one of {sorted(classes)}, 'config': {{...}}}}, "
                             f"got {spec!r}")
        return classes[name](**config)
    if callable(spec):
        return spec
    expected = "None, a name" if allow_none else "a name"
    raise TypeError(f"a {kind} must be {expected}, an instance or a callable, got {spec!r}")


def serialize(obj, classes: dict[str, type]):
    """What :func:`lookup` rebuilds ``obj`` from: ``None`` and names as they are, an instance of one of
    ``classes`` as Keras' ``{"class_name": ..., "config": {...}}`` (its constructor arguments, which these
    classes keep as attributes of the same names), any other callable as itself (not JSON)."""
    if obj is None or isinstance(obj, str):
        return obj
    if type(obj).__name__ in classes and type(obj) is classes[type(obj).__name__]:
        return {"class_name": type(obj).__name__, "config": obj.get_config()}
    return obj
