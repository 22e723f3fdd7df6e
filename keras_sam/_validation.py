"""Argument checks shared by the public constructors."""

import numbers


def check_positive_int(name, value):
    """`value` as an int >= 1, or a clear error naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an integer >= 1. Received: {name}={value!r}"
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be an integer >= 1. Received: {name}={value}"
        )
    return int(value)
