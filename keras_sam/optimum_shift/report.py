"""The result of optimum shifting: a `ShiftReport` of `LayerShift` rows."""

import dataclasses
import math


class ShiftToleranceError(ValueError):
    """Raised when shifting changed the outputs by more than `tolerance`.

    The model has been rolled back to its weights before the call when this
    is raised.
    """


@dataclasses.dataclass
class LayerShift:
    """What optimum shifting did to one layer (one row of a `ShiftReport`).

    Attributes:
        name: the layer's name.
        layer_type: the layer's class name.
        status: `"shifted"`, `"unchanged"` (the inputs span the whole space,
            there is no freedom) or `"skipped"`.
        reason: why the layer was skipped or left unchanged; `None` when it
            was shifted.
        input_rank: rank of the matrix the projection is computed from (the
            centered inputs for `minimize="kernel"`, `[A 1]` for `"joint"`).
        input_dim: the dimension that rank is compared with (`d` or `d + 1`).
        samples: number of input rows (samples, or patches for a conv).
        kernel_norm_before: Frobenius norm of the kernel before shifting.
        kernel_norm_after: Frobenius norm of the kernel after shifting.
        max_abs_change: `max |z' - z|` of the layer's outputs on the data.
        max_rel_change: `max |z' - z| / max |z|` on the data.
    """

    name: str
    layer_type: str
    status: str
    reason: str = None
    input_rank: int = None
    input_dim: int = None
    samples: int = None
    kernel_norm_before: float = None
    kernel_norm_after: float = None
    max_abs_change: float = None
    max_rel_change: float = None

    def to_dict(self):
        return dataclasses.asdict(self)


class ShiftReport:
    """The result of `keras_sam.optimum_shift`: one `LayerShift` per layer.

    `print(report)` gives a table; `report.to_dict()` plain Python values
    (for JSON or logging); `report["dense_1"]` one layer's row.

    Attributes:
        layers: list of `LayerShift`, in the order the layers were processed.
        model: the shifted model (the input model when `inplace=True`, else
            the shifted clone).
        samples: number of calibration samples.
        minimize: `"kernel"` or `"joint"`, the norm that was minimized.
        rtol: relative eigenvalue tolerance used for the rank.
        tolerance: largest relative output change that was allowed.
        output_max_abs_change: `max |y' - y|` of the model's outputs.
        output_max_rel_change: `max |y' - y| / max |y|` of the model's outputs.
        loss_before: mean loss on the data before shifting (when `loss` was
            given), else `None`.
        loss_after: mean loss on the data after shifting, or `None`.
        evaluation_before: on `evaluation_data`, before shifting, a dict
            `{"samples", "loss", "hessian_trace", "top_eigenvalue"}`, or
            `None` when no `evaluation_data` was given.
        evaluation_after: the same after shifting, or `None`.
    """

    def __init__(
        self,
        layers,
        model=None,
        samples=None,
        minimize="kernel",
        rtol=None,
        tolerance=None,
        output_max_abs_change=None,
        output_max_rel_change=None,
        loss_before=None,
        loss_after=None,
        evaluation_before=None,
        evaluation_after=None,
    ):
        self.layers = list(layers)
        self.model = model
        self.samples = samples
        self.minimize = minimize
        self.rtol = rtol
        self.tolerance = tolerance
        self.output_max_abs_change = output_max_abs_change
        self.output_max_rel_change = output_max_rel_change
        self.loss_before = loss_before
        self.loss_after = loss_after
        self.evaluation_before = evaluation_before
        self.evaluation_after = evaluation_after

    @property
    def shifted(self):
        """Names of the layers whose weights changed."""
        return [r.name for r in self.layers if r.status == "shifted"]

    @property
    def kernel_norm_before(self):
        """Frobenius norm over all processed kernels, before shifting."""
        return _total_norm(r.kernel_norm_before for r in self.layers)

    @property
    def kernel_norm_after(self):
        """Frobenius norm over all processed kernels, after shifting."""
        return _total_norm(r.kernel_norm_after for r in self.layers)

    def __getitem__(self, name):
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(
            f"No layer named {name!r} in this report. Layers: "
            f"{[r.name for r in self.layers]}"
        )

    def to_dict(self):
        return {
            "samples": self.samples,
            "minimize": self.minimize,
            "rtol": self.rtol,
            "tolerance": self.tolerance,
            "kernel_norm_before": self.kernel_norm_before,
            "kernel_norm_after": self.kernel_norm_after,
            "output_max_abs_change": self.output_max_abs_change,
            "output_max_rel_change": self.output_max_rel_change,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "evaluation_before": self.evaluation_before,
            "evaluation_after": self.evaluation_after,
            "layers": [row.to_dict() for row in self.layers],
        }

    def __repr__(self):
        return (
            f"<ShiftReport shifted={self.shifted} "
            f"kernel_norm={_fmt(self.kernel_norm_before)}"
            f"->{_fmt(self.kernel_norm_after)}>"
        )

    def __str__(self):
        head = (
            f"Optimum shifting on {self.samples} samples "
            f"(minimize={self.minimize!r}, rtol={self.rtol:g}, "
            f"tolerance={self.tolerance:g})"
        )
        header = (
            f"{'layer':<20} {'type':<12} {'rank/dim':>11} "
            f"{'kernel norm':>21} {'max|dz|':>9} {'rel':>9}  status"
        )
        lines = [head, header, "-" * len(header)]
        for r in self.layers:
            if r.input_rank is None:
                rank = "-"
            else:
                rank = f"{r.input_rank}/{r.input_dim}"
            if r.kernel_norm_before is None:
                norms = "-"
            else:
                norms = (
                    f"{_fmt(r.kernel_norm_before)} -> "
                    f"{_fmt(r.kernel_norm_after)}"
                )
            status = r.status if r.reason is None else f"{r.status}: {r.reason}"
            lines.append(
                f"{r.name[:20]:<20} {r.layer_type[:12]:<12} {rank:>11} "
                f"{norms:>21} {_fmt(r.max_abs_change, 'e'):>9} "
                f"{_fmt(r.max_rel_change, 'e'):>9}  {status}"
            )
        lines.append(
            f"all kernels: norm {_fmt(self.kernel_norm_before)} -> "
            f"{_fmt(self.kernel_norm_after)}; model outputs: max|dy| = "
            f"{_fmt(self.output_max_abs_change, 'e')} (relative "
            f"{_fmt(self.output_max_rel_change, 'e')})"
        )
        if self.loss_before is not None:
            lines.append(
                f"loss: {self.loss_before:.6g} -> {self.loss_after:.6g}"
            )
        if self.evaluation_before is not None:
            before, after = self.evaluation_before, self.evaluation_after
            lines.append(
                f"on the evaluation data ({before['samples']} samples): "
                + "; ".join(
                    f"{key} {before[key]:.6g} -> {after[key]:.6g}"
                    for key in ("loss", "hessian_trace", "top_eigenvalue")
                )
            )
        return "\n".join(lines)


def _fmt(value, kind="f"):
    if value is None:
        return "-"
    if kind == "e":
        return f"{value:.2e}"
    return f"{value:.4f}"


def _total_norm(norms):
    norms = [n for n in norms if n is not None]
    if not norms:
        return None
    return math.sqrt(sum(n * n for n in norms))
