"""Encoder configurations (presets plus overrides) and the one entry point ``encode_tensor``.

RTN, GPTQ and SpQR are configurations of one encoder, all producing the ``bilevel`` encoding:

| preset | method | bits | g | stats | perm | outliers | percdamp |
|---|---|---|---|---|---|---|---|
| spqr-3bit | gptq | 3 | 16 | 3-bit, S=16 | act_order | tau 0.2, leave-one-out | 1.0 |
| spqr-4bit | gptq | 4 | 16 | 3-bit, S=16 | act_order | tau 0.2, leave-one-out | 1.0 |
| gptq-4bit-g128 | gptq | 4 | 128 | fp16 | act_order | none | 0.01 |
| gptq-3bit-g128 | gptq | 3 | 128 | fp16 | act_order | none | 0.01 |
| rtn-4bit-g128 | rtn | 4 | 128 | fp16 | none | none | - |
| rtn-3bit-g16-bilevel | rtn | 3 | 16 | 3-bit, S=16 | none | none | - |
| q2/q3/q4-g16 | gptq, mse | 2/3/4 | 16 | 3-bit, S=16 | act_order | impact 0.5/1/0.3 % | 0.01 |
| q3/q4-g128 | gptq, mse | 3/4 | 128 | fp16 | act_order | impact 0.5/0.2 % | 0.01 |

SpQR settings follow the reference README (tau 0.2, percdamp 1.0, act_order); GPTQ's follow the
GPTQ paper (percdamp 0.01, act_order as in SPEC section 8's worked example). The ``q*`` presets
(issue 18) were chosen by measurement: clipped statistics (``stats_search="mse"``) and a fixed
outlier budget spent by impact (``outlier_select="impact"``) instead of SpQR's tau.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np

from spqr_format import spec
from spqr_format.codec.bilevel import BilevelTensor, PackedBilevel
from spqr_format.codec.gptq import OUTLIER_SELECTS, PERM_ORDERS, encode_gptq
from spqr_format.codec.hessian import validate_hessian
from spqr_format.codec.packing import pack
from spqr_format.codec.quantizer import STATS_SEARCHES, check_params
from spqr_format.codec.reference import decode_bilevel_f32
from spqr_format.codec.rtn import encode_rtn
from spqr_format.errors import BadInputError
from spqr_format.spec import DType

CONFIG_VERSION = 1
METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class EncoderConfig:
    """Every knob of the encoder. ``preset`` names the preset it came from (None = custom).

    ``outlier_threshold``: SpQR's tau (gptq only; None = off). ``outlier_budget``: fraction of
    weights kept as outliers at most (gptq: a cap on tau's outliers, or on its own the largest
    errors; rtn: exactly this fraction, by magnitude).
    """

    method: str = "gptq"
    bits: int = 3
    group_size: int = 16
    stats_bits: int = 3
    stats_group_size: int = 16
    perm_order: str = "act_order"
    percdamp: float = 1.0
    block_size: int = 128
    outlier_threshold: float | None = 0.2
    outlier_budget: float | None = None
    leave_one_out: bool = True
    preset: str | None = None
    version: int = CONFIG_VERSION
    # Added after the first presets; left out of to_dict() at their defaults so that configs
    # (and files) of the original presets stay byte-identical.
    stats_search: str = "minmax"
    outlier_select: str = "column"

    def __post_init__(self) -> None:
        def bad(field: str, msg: str) -> BadInputError:
            return BadInputError(f"encoder config: {field} {msg}", field=f"config.{field}")

        if self.version != CONFIG_VERSION:
            raise bad("version", f"must be {CONFIG_VERSION}, got {self.version!r}")
        if self.method not in METHODS:
            raise bad("method", f"must be one of {METHODS}, got {self.method!r}")
        check_params(self.bits, self.group_size, self.stats_bits, self.stats_group_size, None)
        if self.perm_order not in PERM_ORDERS:
            raise bad("perm_order", f"must be one of {PERM_ORDERS}, got {self.perm_order!r}")
        if self.method == "rtn" and self.perm_order != "identity":
            raise bad("perm_order", "must be identity for rtn (no Hessian to order by)")
        pd = self.percdamp
        if (
            isinstance(pd, bool)
            or not isinstance(pd, (int, float))
            or not (math.isfinite(pd) and pd >= 0)
        ):
            raise bad("percdamp", f"must be a finite number >= 0, got {pd!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise bad("block_size", f"must be a positive integer, got {bs!r}")
        tau = self.outlier_threshold
        if tau is not None:
            if (
                isinstance(tau, bool)
                or not isinstance(tau, (int, float))
                or not (math.isfinite(tau) and tau > 0)
            ):
                # inf would run the whole encode and then fail to store the setting (JSON)
                raise bad("outlier_threshold", f"must be a finite number > 0 or null, got {tau!r}")
            if self.method == "rtn":
                raise bad("outlier_threshold", "needs a Hessian; use outlier_budget with rtn")
        b = self.outlier_budget
        if b is not None and (
            isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1
        ):
            raise bad("outlier_budget", f"must be a fraction in [0, 1) or null, got {b!r}")
        if not isinstance(self.leave_one_out, bool):
            raise bad("leave_one_out", f"must be true or false, got {self.leave_one_out!r}")
        if self.stats_search not in STATS_SEARCHES:
            raise bad("stats_search", f"must be one of {STATS_SEARCHES}, got {self.stats_search!r}")
        if self.outlier_select not in OUTLIER_SELECTS:
            raise bad(
                "outlier_select", f"must be one of {OUTLIER_SELECTS}, got {self.outlier_select!r}"
            )
        if self.outlier_select == "impact":
            if self.method != "gptq":
                raise bad("outlier_select", "impact needs a Hessian (method gptq)")
            if tau is not None:
                raise bad(
                    "outlier_threshold",
                    "must be null with outlier_select impact (the budget sets the threshold)",
                )
        if self.preset is not None and not isinstance(self.preset, str):
            raise bad("preset", f"must be a string or null, got {self.preset!r}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (for the file's ``encoder.settings`` metadata);
        fields added after version 1 appear only when they differ from their defaults."""
        d = dataclasses.asdict(self)
        for key, default in _LATE_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not be ignored)."""
        if not isinstance(d, dict):
            raise BadInputError(f"encoder config must be an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BadInputError(f"encoder config: unknown keys {unknown}", field="config")
        return cls(**d)

    def with_overrides(self, **overrides) -> EncoderConfig:
        """A validated copy with some knobs changed (the ``preset`` name is kept)."""
        return EncoderConfig.from_dict({**self.to_dict(), **overrides})


_LATE_DEFAULTS = {"stats_search": "minmax", "outlier_select": "column"}

_SPQR = dict(
    method="gptq", group_size=16, stats_bits=3, stats_group_size=16, perm_order="act_order",
    percdamp=1.0, outlier_threshold=0.2, leave_one_out=True,
)  # fmt: skip
_GPTQ = dict(
    method="gptq", group_size=128, stats_bits=0, stats_group_size=0, perm_order="act_order",
    percdamp=0.01, outlier_threshold=None,
)  # fmt: skip
_RTN = dict(method="rtn", perm_order="identity", outlier_threshold=None, percdamp=0.0)

PRESETS: dict[str, EncoderConfig] = {
    "spqr-3bit": EncoderConfig(**_SPQR, bits=3, preset="spqr-3bit"),
    "spqr-4bit": EncoderConfig(**_SPQR, bits=4, preset="spqr-4bit"),
    "gptq-4bit-g128": EncoderConfig(**_GPTQ, bits=4, preset="gptq-4bit-g128"),
    "gptq-3bit-g128": EncoderConfig(**_GPTQ, bits=3, preset="gptq-3bit-g128"),
    "rtn-4bit-g128": EncoderConfig(
        **_RTN, bits=4, group_size=128, stats_bits=0, stats_group_size=0, preset="rtn-4bit-g128"
    ),
    "rtn-3bit-g16-bilevel": EncoderConfig(
        **_RTN,
        bits=3,
        group_size=16,
        stats_bits=3,
        stats_group_size=16,
        preset="rtn-3bit-g16-bilevel",
    ),  # fmt: skip
}

# Issue 18 presets: GPTQ with damping 0.01, clipped ("mse") statistics and outliers chosen by
# impact under a fixed budget (measurements: benchmarks/results/encoder-quality-2026-12-07.md).
_Q = dict(
    method="gptq", perm_order="act_order", percdamp=0.01, outlier_threshold=None,
    leave_one_out=True, stats_search="mse", outlier_select="impact",
)  # fmt: skip
_BILEVEL = dict(stats_bits=3, stats_group_size=16)
_FP16 = dict(stats_bits=0, stats_group_size=0)
PRESETS.update(
    {
        "q2-g16": EncoderConfig(**_Q, **_BILEVEL, bits=2, group_size=16, outlier_budget=0.005,
                                preset="q2-g16"),
        "q3-g16": EncoderConfig(**_Q, **_BILEVEL, bits=3, group_size=16, outlier_budget=0.01,
                                preset="q3-g16"),
        "q3-g128": EncoderConfig(**_Q, **_FP16, bits=3, group_size=128, outlier_budget=0.005,
                                 preset="q3-g128"),
        "q4-g16": EncoderConfig(**_Q, **_BILEVEL, bits=4, group_size=16, outlier_budget=0.003,
                                preset="q4-g16"),
        "q4-g128": EncoderConfig(**_Q, **_FP16, bits=4, group_size=128, outlier_budget=0.002,
                                 preset="q4-g128"),
    }
)  # fmt: skip


def get_preset(name: str, **overrides) -> EncoderConfig:
    """The preset ``name`` with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise BadInputError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].with_overrides(**overrides) if overrides else PRESETS[name]


def section_bits(t: BilevelTensor | PackedBilevel) -> dict[str, int]:
    """Exact size in bits of each section of ``t`` (SPEC section 8), from its packed form."""
    packed = pack(t) if isinstance(t, BilevelTensor) else t
    return {spec.ROLE_NAMES[role]: 8 * a.nbytes for role, a in packed.sections()}


def bits_per_weight(t: BilevelTensor | PackedBilevel) -> float:
    """Bits per weight of ``t`` by SPEC section 8: all section bits over ``m * n``."""
    m, n = t.shape
    return sum(section_bits(t).values()) / (m * n)


def relative_output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """``tr((W-Q) H (W-Q)^T) / tr(W H W^T)``, f32 GEMMs in row chunks, f64 sums."""
    h32 = np.asarray(h, dtype=np.float32)
    num = den = 0.0
    m = w.shape[0]
    step = max(1, (32 << 20) // (4 * max(w.shape[1], 1)))
    for r0 in range(0, m, step):
        wc = np.asarray(w[r0 : r0 + step], dtype=np.float32)
        dc = wc - np.asarray(q[r0 : r0 + step], dtype=np.float32)
        num += float(np.einsum("ij,ij->", dc @ h32, dc, dtype=np.float64))
        den += float(np.einsum("ij,ij->", wc @ h32, wc, dtype=np.float64))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _default_dtype(weight: np.ndarray) -> DType:
    return DType.FLOAT16 if getattr(weight, "dtype", None) == np.float16 else DType.FLOAT32


def make_report(
    t: BilevelTensor,
    packed: PackedBilevel,
    config: EncoderConfig,
    method: str,
    warning: str | None,
    relative_weight_error: float,
    relative_output_error: float | None,
) -> dict:
    """The report row of one encoded tensor (keys listed in :func:`encode_tensor`)."""
    k = len(t.outliers) if t.outliers is not None else 0
    return {
        "method": method,
        "preset": config.preset,
        "fallback": warning is not None,
        "warning": warning,
        "shape": list(t.shape),
        "bits_per_weight": bits_per_weight(packed),
        "outliers": k,
        "outlier_percent": 100.0 * k / (t.shape[0] * t.shape[1]),
        "relative_weight_error": relative_weight_error,
        "relative_output_error": relative_output_error,
    }


def rtn_fallback_warning(config: EncoderConfig, name: str | None) -> str:
    """The warning of a ``gptq`` configuration encoding a tensor without a Hessian."""
    return (
        f"tensor {name or '?'}: no Hessian, encoded with RTN "
        f"({config.bits}-bit, g{config.group_size}) instead of {config.preset or 'gptq'}"
    )


def check_encoder_config(config: object, name: str | None) -> None:
    """BadInputError unless ``config`` is an :class:`EncoderConfig`."""
    if not isinstance(config, EncoderConfig):
        raise BadInputError(
            f"config must be an EncoderConfig, got {type(config).__name__}", tensor=name
        )


def encoder_plan(
    config: EncoderConfig, hessian: object, name: str | None, dtype: DType
) -> tuple[str, str | None, dict]:
    """What an encoder of ``config`` runs: ``(method, warning, common)``. A ``gptq``
    configuration without a Hessian falls back to ``rtn`` with a ``RuntimeWarning`` (reported
    at the encoder's caller); ``common`` holds the options every encoder takes."""
    warning = None
    method = config.method
    if method == "gptq" and hessian is None:
        warning = rtn_fallback_warning(config, name)
        warnings.warn(warning, RuntimeWarning, stacklevel=3)
        method = "rtn"
    common = dict(
        bits=config.bits,
        group_size=config.group_size,
        stats_bits=config.stats_bits,
        stats_group_size=config.stats_group_size,
        dtype=dtype,
        name=name,
    )
    return method, warning, common


def encode_tensor(
    weight: np.ndarray,
    config: EncoderConfig,
    hessian: np.ndarray | None = None,
    name: str | None = None,
    *,
    dtype: DType | None = None,
    info: dict | None = None,
) -> tuple[BilevelTensor, dict]:
    """Encode one weight ``[m, n]`` per ``config``; returns the tensor and its report.

    ``dtype``: the tensor's decode dtype (default: float16 for fp16 weights, else float32; pass
    BFLOAT16 for bf16 weights widened to f32). A ``gptq`` config without a Hessian falls back to
    RTN with the same parameters, with a ``RuntimeWarning`` and ``report["fallback"] = True``.
    ``info`` receives solver timings (kept out of the report so reports stay deterministic).
    Report keys: method, preset, fallback, warning, shape, bits_per_weight, outliers,
    outlier_percent, relative_weight_error, relative_output_error (None without a Hessian).
    """
    check_encoder_config(config, name)
    dt = _default_dtype(weight) if dtype is None else dtype
    method, warning, common = encoder_plan(config, hessian, name, dt)
    if method == "rtn":
        if hessian is not None and isinstance(weight, np.ndarray) and weight.ndim == 2:
            hessian = validate_hessian(hessian, weight.shape[1], name=name)
        t = encode_rtn(
            weight,
            outlier_fraction=config.outlier_budget or 0.0,
            stats_search=config.stats_search,
            **common,
        )
    else:
        t = encode_gptq(
            weight,
            hessian,
            perm_order=config.perm_order,
            percdamp=config.percdamp,
            block_size=config.block_size,
            outlier_threshold=config.outlier_threshold,
            outlier_budget=config.outlier_budget,
            leave_one_out=config.leave_one_out,
            stats_search=config.stats_search,
            outlier_select=config.outlier_select,
            info=info,
            **common,
        )
    w = np.asarray(weight, dtype=np.float32)
    packed = pack(t)  # reports measure exactly what the file will hold and decode to
    q = decode_bilevel_f32(packed, validate=False)
    d = q - w
    wn = float(np.sqrt(np.einsum("ij,ij->", w, w, dtype=np.float64)))  # f64 sums, no f64 copy
    dn = float(np.sqrt(np.einsum("ij,ij->", d, d, dtype=np.float64)))
    del d
    rel_w = dn / wn if wn > 0 else (0.0 if dn == 0 else math.inf)
    rel_out = relative_output_error(w, q, hessian) if hessian is not None else None
    report = make_report(t, packed, config, method, warning, rel_w, rel_out)
    return t, report
