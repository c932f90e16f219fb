"""What quantization cost, per tensor: the rows of ``spqr report`` and its plot.

Sizes come from the file itself (section lengths, SPEC section 8), so they are true of any
``.spqr`` file; the errors (relative weight error, relative output error tr(E H E^T) /
tr(W H W^T) when the encoder had a Hessian) come from the ``encoder.report`` metadata that
``spqr encode`` and ``spqr quantize-model`` write, and are absent for files written otherwise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from spqr_format import api
from spqr_format.errors import BadInputError

QUANTIZED = ("bilevel", "channel_mixed")  # the encodings a report summarises


@dataclass(frozen=True)
class ReportRow:
    name: str
    shape: tuple[int, ...]
    encoding: str
    bits_per_weight: float  # from the file's section lengths
    outlier_percent: float
    relative_weight_error: float | None  # from encoder.report, when recorded
    relative_output_error: float | None
    elements: int
    config: str | None = None  # the allocated configuration (files written with --target-bits)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "encoding": self.encoding,
            "bits_per_weight": self.bits_per_weight,
            "outlier_percent": self.outlier_percent,
            "relative_weight_error": self.relative_weight_error,
            "relative_output_error": self.relative_output_error,
            "elements": self.elements,
            "config": self.config,
        }


def _finite_or_none(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def build_report(f: api.SpqrFile) -> tuple[list[ReportRow], dict]:
    """Rows in file order and a summary (bits per weight of the whole file and of the
    quantized tensors, weighted means of the recorded errors)."""
    recorded = {}
    report = f.metadata.get("encoder.report")
    if isinstance(report, list):
        recorded = {r.get("name"): r for r in report if isinstance(r, dict)}
    alloc = f.metadata.get("encoder.allocation")
    chosen = {}
    if isinstance(alloc, dict) and isinstance(alloc.get("tensors"), dict):
        chosen = {k: v.get("label") for k, v in alloc["tensors"].items() if isinstance(v, dict)}
    rows = []
    for i in f.infos():
        rec = recorded.get(i.name, {})
        rows.append(
            ReportRow(
                name=i.name,
                shape=tuple(i.shape),
                encoding=i.encoding,
                bits_per_weight=i.bits_per_weight,
                outlier_percent=100.0 * i.outlier_fraction,
                relative_weight_error=_finite_or_none(rec.get("relative_weight_error")),
                relative_output_error=_finite_or_none(rec.get("relative_output_error")),
                elements=i.elements,
                config=chosen.get(i.name) if isinstance(chosen.get(i.name), str) else None,
            )
        )
    quant = [r for r in rows if r.encoding in QUANTIZED]

    def mean(key: str) -> float | None:
        pairs = [(getattr(r, key), r.elements) for r in quant if getattr(r, key) is not None]
        weight = sum(e for _, e in pairs)
        return sum(v * e for v, e in pairs) / weight if weight else None

    def bpw(items) -> float:
        elems = sum(r.elements for r in items)
        return sum(r.bits_per_weight * r.elements for r in items) / elems if elems else 0.0

    summary = {
        "tensors": len(rows),
        "quantized_tensors": len(quant),
        "bits_per_weight_all": bpw(rows),
        "bits_per_weight_quantized": bpw(quant),
        "mean_relative_weight_error": mean("relative_weight_error"),
        "mean_relative_output_error": mean("relative_output_error"),
        "preset": f.metadata.get("encoder.preset"),
        "allocation": None,
    }
    if chosen:
        configs: dict[str, int] = {}
        for r in quant:
            if r.config:
                configs[r.config] = configs.get(r.config, 0) + 1
        summary["allocation"] = {
            "target_bits": _finite_or_none(alloc.get("target_bits")),
            "bits_per_weight": _finite_or_none(alloc.get("bits_per_weight")),
            "configs": configs,
        }
    return rows, summary


def plot_report(rows: list[ReportRow], path: str, title: str = "") -> None:
    """A PNG of the quantized tensors: bits per weight, outlier % and the recorded output (or
    weight) error per tensor, in file order. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInputError(
            "--plot needs matplotlib (pip install 'spqr-format[plot]')", field="plot"
        ) from None
    quant = [r for r in rows if r.encoding in QUANTIZED]
    if not quant:
        raise BadInputError(
            "the file has no quantized (bilevel or channel_mixed) tensor to plot", field="plot"
        )
    x = range(len(quant))
    err_key = (
        "relative_output_error"
        if any(r.relative_output_error is not None for r in quant)
        else "relative_weight_error"
    )
    errors = [getattr(r, err_key) for r in quant]
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.18 * len(quant)), 7.5), sharex=True)
    axes[0].bar(x, [r.bits_per_weight for r in quant], color="tab:blue")
    axes[0].set_ylabel("bits / weight")
    axes[1].bar(x, [r.outlier_percent for r in quant], color="tab:orange")
    axes[1].set_ylabel("outliers %")
    axes[1].set_ylim(bottom=0)
    axes[2].bar(x, [e if e is not None else 0.0 for e in errors], color="tab:red")
    axes[2].set_ylabel(err_key.replace("_", " "))
    axes[2].set_xticks(list(x))
    axes[2].set_xticklabels([r.name for r in quant], rotation=90, fontsize=6)
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)  # atomic: no half-written picture under the output name
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
