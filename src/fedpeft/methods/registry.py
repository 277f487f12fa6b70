"""Methods registered by name: ``@register`` on a :class:`~fedpeft.methods.base.Method` subclass."""

from __future__ import annotations

from fedpeft.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name = cls.name``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    """The class registered as ``name``; KeyError if there is none."""
    return _METHODS[name]


def method_names() -> list[str]:
    return list(_METHODS)


def build_method(name: str, options: object | None = None) -> Method:
    return get_method_class(name)(options)
