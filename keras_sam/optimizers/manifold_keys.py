"""RSAM's `manifold=` argument: keys, their matching, and resolution."""

import keras
from keras import ops

from keras_sam import manifolds as sam_manifolds
from keras_sam.optimizers.sam import is_weight_like


def spec(manifold):
    """`manifold=` as a list of `(key, Manifold)`; key a string or callable."""
    if manifold is None:
        return []
    if isinstance(manifold, dict):
        items = list(manifold.items())
    elif isinstance(manifold, (list, tuple)):
        items = list(manifold)
    else:
        raise TypeError(
            "`manifold` must be a dict mapping layer names, variable paths "
            "or predicates to manifolds. Received: "
            f"manifold={manifold!r}"
        )
    spec = []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise TypeError(
                "`manifold` entries must be (key, manifold) pairs. "
                f"Received: {item!r} in manifold={manifold!r}"
            )
        key, value = item
        if isinstance(key, dict):
            # A predicate serialized by `get_config`.
            key = keras.saving.deserialize_keras_object(key)
        if not isinstance(key, str) and not callable(key):
            raise TypeError(
                "`manifold` keys must be layer names, variable paths or "
                f"predicates `fn(variable) -> bool`. Received: key={key!r}"
            )
        try:
            spec.append((key, sam_manifolds.get(value)))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{e} (for the `manifold` key {key!r})") from e
    return spec


def key_matches(key, variable):
    """Predicate, variable path (or its tail), or layer name (weights)."""
    if callable(key):
        return bool(key(variable))
    path = variable.path
    if "/" in key:
        return path == key or path.endswith("/" + key)
    return key in path.split("/")[:-1] and is_weight_like(variable)


def key_name(key):
    return key if isinstance(key, str) else getattr(key, "__name__", repr(key))


def concrete_value(variable):
    """The variable's value as numpy, or `None` inside a traced function."""
    try:
        return ops.convert_to_numpy(variable.value)
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return None


def resolve(spec, var_list):
    """The manifold of each variable in `var_list`, checked: every key
    matches a variable, no variable gets two manifolds, and each manifold
    variable fits its manifold (and lies on it, where values are concrete).
    """
    used = [False] * len(spec)
    manifolds = []
    for v in var_list:
        found = []
        for i, (key, m) in enumerate(spec):
            if key_matches(key, v):
                used[i] = True
                found.append((key_name(key), m))
        constraint = getattr(v, "constraint", None)
        if isinstance(constraint, sam_manifolds.ManifoldConstraint):
            found.append(("its constraint", constraint.manifold))
        distinct = []
        for _, m in found:
            if m not in distinct:
                distinct.append(m)
        if len(distinct) > 1:
            raise ValueError(
                f"Variable '{v.path}' is mapped to different manifolds: "
                + ", ".join(f"{m!r} (from {k!r})" for k, m in found)
            )
        m = distinct[0] if distinct else sam_manifolds.Euclidean()
        if not isinstance(m, sam_manifolds.Euclidean):
            m.check_shape(tuple(v.shape), v.path)
            value = concrete_value(v)
            if value is not None:
                m.check(value, v.path)
        manifolds.append(m)
    for (key, _), was_used in zip(spec, used):
        if not was_used:
            paths = [v.path for v in var_list]
            raise ValueError(
                f"No trainable variable matches the `manifold` key "
                f"{key_name(key)!r}. Keys are layer names, variable "
                "paths (or their tails) and predicates. Variable paths: "
                f"{paths[:20]}{' ...' if len(paths) > 20 else ''}"
            )
    return manifolds


def serialize(spec):
    """The config form of a manifold spec (`None` when empty): keys as
    names or serialized objects, manifolds serialized."""
    return [
        [
            (
                key
                if isinstance(key, str)
                else keras.saving.serialize_keras_object(key)
            ),
            sam_manifolds.serialize(m),
        ]
        for key, m in spec
    ] or None
