"""Schedules decided on the host: one compiled program per kind of step.

With a schedule the host can decide (`Every`, `Random`, `LatePhase`),
`SAMModel` compiles two train functions, a two-pass and a one-pass program,
behind a dispatcher that asks the schedule which to run: no conditional
sits inside a compiled step, so a plain step costs what a plain Keras step
costs.
"""

import keras

from keras_sam import _keras_compat


class HostPrograms:
    """The `SAMModel` side of host-side schedules."""

    @property
    def pass_kind(self):
        """`"two"` or `"one"` while the host runs a program compiled for
        that kind of step (read when the step is traced); `None` when the
        step decides inside itself."""
        return getattr(self, "_pass_kind", None)

    def make_train_function(self, force=False):
        """Keras' train function; with a schedule decided on the host
        (`Every`, `Random`, `LatePhase`), two of them, a two-pass and a one-pass
        program, behind a dispatcher that asks the schedule which to run.

        The dispatcher counts steps on the host; it reads the optimizer's
        `steps` variable once when it is built and at the start of each
        `fit` (or after `load_weights`), never per step.
        """
        # New buffers of the batch's shape (SAMPa) need a new function.
        force = self._build_batch_state() or force
        sam = self.sam_optimizer
        if sam is None or not sam.host_schedule(self.steps_per_execution):
            return super().make_train_function(force=force)
        if self.train_function is not None and not force:
            return self.train_function
        programs = {}
        for kind in ("two", "one"):
            # A step function of its own per kind (JAX caches compiled
            # programs by function), which runs as that kind when traced.
            programs[kind] = _keras_compat.make_train_function_as(
                self, _step_of_kind(self, kind)
            )
        self._host_step = None
        model = self

        def train_function(*args):
            if model._host_step is None:
                model._host_step = model._read_steps(args)
            kind = "two" if sam.schedule.two_pass(model._host_step) else "one"
            model._pass_kind = kind  # read when `programs[kind]` traces
            try:
                outputs = programs[kind](*args)
            finally:
                model._pass_kind = None
            model._host_step += 1  # only once the step has run
            return outputs

        train_function.programs = programs
        self.train_function = train_function
        return train_function

    def _read_steps(self, args):
        """The optimizer's step count, read once (a device sync)."""
        sam = self.sam_optimizer
        value = sam.steps
        if len(args) == 2:
            # JAX: in `fit` the variables are purged and the state is
            # carried in the call's first argument.
            optimizer_values = args[0][2]
            index = next(
                i
                for i, v in enumerate(self.optimizer.variables)
                if v is sam.steps
            )
            value = optimizer_values[index]
        return int(keras.ops.convert_to_numpy(value))

    def _resync_host_step(self):
        self._host_step = None

    def fit(self, *args, **kwargs):
        self._resync_host_step()
        return super().fit(*args, **kwargs)


def _step_of_kind(model, kind):
    """`model.train_step` running with `model.pass_kind == kind`."""

    def train_step(*args):
        previous, model._pass_kind = model.pass_kind, kind
        try:
            return type(model).train_step(model, *args)
        finally:
            model._pass_kind = previous

    return train_step
