"""User data checked against a model's shapes, before it is used.

The check runs the model symbolically (no computation) on the data's
shapes with an unknown batch size, so it works on every backend, eagerly or
inside a traced step.
"""

import keras


def check_fits(owner, x, y, model, y_train=None):
    """Raises a `ValueError` naming `owner` when `(x, y)` cannot feed `model`.

    `x` must fit the model's inputs. With `y_train` (the training targets)
    given, the trailing shape of each target in `y` must match the model's
    output, sparse labels of it (the output's shape without its last axis,
    or with it set to 1), or the training targets.
    """
    try:
        output = model.compute_output_spec(
            keras.tree.map_structure(
                lambda a: keras.KerasTensor(
                    (None,) + tuple(a.shape[1:]),
                    dtype=keras.backend.standardize_dtype(a.dtype),
                ),
                x,
            )
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"The `validation_data` of `{owner}` does not fit the model. "
            f"Received: validation_data x of shape {shapes(x)}. The model "
            f"says: {e}"
        ) from e
    if y_train is None:
        return
    out = trailing(output)
    fits = [out, trailing(y_train)]
    fits += [[s[:-1] for s in out], [s[:-1] + (1,) for s in out]]
    if not any(_same(trailing(y), f) for f in fits):
        raise ValueError(
            f"The targets of the `validation_data` of `{owner}` match "
            "neither the model's output nor the training targets. Received: "
            f"validation_data y of shape {shapes(y)}, model output of shape "
            f"{shapes(output)}, training y of shape {shapes(y_train)}"
        )


def shapes(structure):
    """Shapes of the arrays of `structure`, as tuples (one if alone)."""
    found = [tuple(a.shape) for a in keras.tree.flatten(structure)]
    return found[0] if len(found) == 1 else found


def trailing(structure):
    """The shapes of the arrays of `structure` without their batch axis."""
    return tuple(tuple(a.shape[1:]) for a in keras.tree.flatten(structure))


def _same(shapes, others):
    """Equal lists of shapes, an unknown (`None`) dimension matching any."""
    return len(shapes) == len(others) and all(
        len(a) == len(b)
        and all(i is None or j is None or i == j for i, j in zip(a, b))
        for a, b in zip(shapes, others)
    )
