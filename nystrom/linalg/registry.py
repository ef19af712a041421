"""Name lookup shared by the strategy and solver registries."""

from __future__ import annotations


def resolve(argument: str, plural: str, registry: dict, value):
    """Return ``registry[value]()`` for a name, ``value`` itself for a callable.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    TypeError
        For anything that is neither a string nor callable.
    """
    if isinstance(value, str):
        try:
            return registry[value]()
        except KeyError:
            raise ValueError(f"unknown {argument} {value!r}; valid {plural} are {sorted(registry)}") from None
    if callable(value):
        return value
    raise TypeError(f"{argument} must be a name in {sorted(registry)} or a callable, got {type(value).__name__}")
