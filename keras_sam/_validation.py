"""Argument checks shared by every public constructor and function.

Each check returns the value in its canonical Python type, or raises a
`TypeError` (wrong type) or `ValueError` (right type, bad value) whose
message names the argument and repeats the value received (`repr`, so a
string shows its quotes).
"""

import math
import numbers


def _is_real(value):
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _is_int(value):
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_int(name, value, minimum=None):
    """`value` as an int (>= `minimum` when given)."""
    bound = "" if minimum is None else f" >= {minimum}"
    if not _is_int(value):
        raise TypeError(
            f"`{name}` must be an integer{bound}. Received: {name}={value!r}"
        )
    if minimum is not None and value < minimum:
        raise ValueError(
            f"`{name}` must be an integer{bound}. Received: {name}={value!r}"
        )
    return int(value)


def check_positive_int(name, value):
    """`value` as an int >= 1."""
    return check_int(name, value, minimum=1)


def check_float(
    name, value, low=None, high=None, low_open=False, high_open=True
):
    """`value` as a finite float in the interval given by `low`/`high`.

    `low_open`/`high_open` make the bound strict. Booleans and strings are
    refused with a `TypeError`.
    """
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    wanted = "a finite float" + (" " + " and ".join(bounds) if bounds else "")
    if not _is_real(value):
        raise TypeError(
            f"`{name}` must be {wanted}. Received: {name}={value!r} of type "
            f"{type(value).__name__}"
        )
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        raise ValueError(
            f"`{name}` must be {wanted}. Received: {name}={value!r}"
        )
    return float(value)


def check_rho(value, name="rho"):
    """The perturbation radius: a finite float >= 0."""
    return check_float(name, value, low=0.0)


def check_bool(name, value):
    """`value` must be `True` or `False`."""
    if not isinstance(value, bool):
        raise TypeError(
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )
    return value


def check_seed(value, name="seed"):
    """An integer seed or `None`."""
    if value is not None and not _is_int(value):
        raise TypeError(
            f"`{name}` must be an integer or None. Received: {name}={value!r}"
        )
    return None if value is None else int(value)


def check_choice(name, value, choices):
    """`value` must be one of `choices` (compared with `==`)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"`{name}` must be one of {list(choices)}. "
            f"Received: {name}={value!r}"
        )
    return value
