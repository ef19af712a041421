"""The arguments of an evaluation: FNA layers, strategy and solver specs, and checks of the rest."""

from __future__ import annotations

import dataclasses

from nystrom import get_solver, get_strategy

DEFAULT_LANDMARKS = (16, 32, 64, 128)
DEFAULT_STRATEGIES = ("norm", "fps", "uniform", "segment_means")
DEFAULT_SOLVERS = ("newton_schulz",)


def parse_layers(text):
    """Layer indices from ``"6-11"``, ``"3,5"``, ``"0-2,9"`` or ``"-1"`` (negative: counted from the last layer, as
    :func:`nystrom.fna` takes them; ranges are of non-negative ints); ``None`` for ``None`` (the model's later half).

    Raises
    ------
    ValueError
        If ``text`` is not such a list of ints and ranges.
    """
    if text is None:
        return None
    layers = []
    try:
        for part in text.split(","):
            part = part.strip()
            if part.startswith("-"):
                layers.append(int(part))
                continue
            first, dash, last = part.partition("-")
            if dash and int(last) < int(first):
                # A reversed range is empty: inside a list it vanished silently (a review: "1,7-3" ran layer 1).
                raise ValueError(part)
            layers.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    except ValueError:
        layers = []
    if not layers:
        raise ValueError(f"layers must look like '6-11', '3,5' or '-1' (ints and ranges; negative: from the last "
                         f"layer), got {text!r}")
    return tuple(sorted(set(layers)))


def _option_value(key, text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered == "none":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ValueError(f"option {key!r} needs a number, 'true', 'false' or 'none', got {text!r}")


def parse_spec(text, kind):
    """A strategy or solver object from ``"name"`` or ``"name:key=value,key=value"``.

    ``"pinv:rtol=0"`` is ``PInv(rtol=0)``, ``"newton_schulz:iters=12"`` is ``NewtonSchulz(iters=12)``,
    ``"norm:sink_ratio=8"`` is ``Norm(sink_ratio=8)``; values are ints, floats, ``true``, ``false`` or ``none``
    (``"fps:from_guaranteed=false,use_queries=true"`` is the FNA authors' landmark rule).

    Parameters
    ----------
    text : str
    kind : {"strategy", "solver"}

    Returns
    -------
    object
        What :func:`nystrom.get_strategy` or :func:`nystrom.get_solver` returns for the name, with the options set.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones), a malformed option, or an option the object
        does not have or rejects.
    """
    if kind not in ("strategy", "solver"):
        raise ValueError(f"kind must be 'strategy' or 'solver', got {kind!r}")
    if not isinstance(text, str):
        raise TypeError(f"{kind} must be a str such as 'pinv:rtol=0', got {type(text).__name__}")
    name, _, options = text.partition(":")
    obj = (get_strategy if kind == "strategy" else get_solver)(name.strip())
    if not options:
        return obj
    kwargs = {}
    for item in options.split(","):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise ValueError(f"{kind} options must be key=value pairs separated by commas, got {text!r}")
        kwargs[key] = _option_value(key, value)
    fields = [f.name for f in dataclasses.fields(obj)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"{kind} {name!r} has no option {unknown}; its options are {fields}")
    return dataclasses.replace(obj, **kwargs)


def check_positive_ints(name, values):
    """``values`` as a non-empty tuple of distinct positive ints; ``ValueError`` naming ``name`` otherwise (a repeated
    one would be evaluated twice, as :func:`check_names` says)."""
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be positive ints, got {values!r}")
    return distinct(name, values)


def check_names(name, values):
    """``values`` as a non-empty tuple of distinct str; ``ValueError`` naming ``name`` otherwise (a repeated one
    would be evaluated twice, the second run's files over the first's)."""
    values = tuple(values)
    if not values or any(not isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a non-empty list of str, got {values!r}")
    return distinct(name, values)


def distinct(name, values):
    """``values`` (a tuple) if no value repeats; ``ValueError`` naming ``name`` and the repeated ones otherwise."""
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{name} lists {', '.join(map(str, repeated))} more than once")
    return values

