"""CuPy layer: compile the kernels once, upload a bilevel tensor, launch on the current stream.

Needs CuPy and a CUDA device; imported lazily by :mod:`spqr_format.gpu`.

* The kernels are compiled by NVRTC through ``cupy.RawModule`` on first use, once per device and
  process, as small modules (one (bits, stats_bits) configuration's kernels, or the few shared
  ones: :func:`spqr_format.gpu._kernels.kernel_module`); CuPy also caches the binaries on disk
  (``~/.cupy/kernel_cache``, ``CUPY_CACHE_DIR``), and :func:`spqr_format.gpu.precompile` fills
  that cache ahead of time.
* Launches go to CuPy's *current* stream (``with cupy.cuda.Stream(): ...``, or
  ``cupy.cuda.Stream.from_external(...)`` to run on another framework's stream). Nothing
  synchronises the device; a bad launch raises (CuPy checks ``cuLaunchKernel``'s result), and an
  asynchronous fault surfaces at the next synchronising call, as for any CUDA library.
* The sections are uploaded unchanged; the bit-exact dequantizer and the SIMT kernels read the
  SPEC layout directly. Tensors with a tensor-core path (bits 2/3/4, group size 16, 1..4-bit
  statistics, see :mod:`spqr_format.gpu.tile_layout`) are also repacked once, on the GPU, into
  the tile layout that ``kernels/spqr_tc.cu`` reads; f16 matvec / matmul then run on tensor
  cores (``tensor_cores=False``, or ``SPQR_GPU_PLAN=tc=0`` for experiments, turns this off).
* Which path a matmul takes is the launch plan's choice (:mod:`spqr_format.gpu.plan`): fused
  tensor-core or SIMT kernels for small batches, and above the plan's crossover (or for a
  configuration without a fused kernel) ``dense``: dequantize into a workspace in the input
  dtype and one cuBLAS GEMM (f32 accumulation) on the same stream, the reason logged once.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import numpy as np

from spqr_format.codec.bilevel import BilevelGeometry, PackedBilevel
from spqr_format.codec.row_layout import RowLayout, row_words, to_row_layout
from spqr_format.errors import BadInputError
from spqr_format.gpu import _kernels as K
from spqr_format.gpu import plan as P

try:  # pragma: no cover - exercised only where CuPy is installed
    import cupy as cp
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "spqr_format.gpu needs CuPy (pip install cupy-cuda12x or cupy-cuda13x) and a CUDA GPU"
    ) from exc

_lock = threading.Lock()
_modules: dict[tuple[int, str], cp.RawModule] = {}
_functions: dict[tuple[int, str], object] = {}
_noticed: set[tuple] = set()


def compiled(spec: K.ModuleSpec) -> cp.RawModule:
    """The module ``spec`` (:func:`spqr_format.gpu._kernels.kernel_module`) for the current
    device: compiled by NVRTC on first use (or loaded from CuPy's on-disk kernel cache), then
    kept for the process."""
    key = (cp.cuda.Device().id, spec.key)
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                mod = cp.RawModule(code=spec.code(), options=spec.options())
                _modules[key] = mod
    return mod


def module(source=None) -> cp.RawModule:
    """The whole module of ``source`` (default: the SPEC-layout kernels, every entry point) for
    the current device. The launchers use :func:`function`, which compiles only the small
    module (one configuration's kernels) an entry point is in."""
    source = source or K.KERNEL_SOURCE
    return compiled(K.ModuleSpec(f"whole:{source}", (source,)))


def function(name: str):
    """The entry point ``name``, from the module :func:`spqr_format.gpu._kernels.kernel_module`
    names (compiled on first use)."""
    dev = cp.cuda.Device().id
    key = (dev, name)
    fn = _functions.get(key)
    if fn is None:
        fn = compiled(K.kernel_module(name)).get_function(name)
        _functions[key] = fn
    return fn


def _ptr(a) -> np.uint64:
    """Device pointer of a CuPy array, a torch tensor, an int, or None (NULL)."""
    if a is None:
        return np.uint64(0)
    if isinstance(a, (int, np.integer)):
        return np.uint64(a)
    if hasattr(a, "data") and hasattr(a.data, "ptr"):
        return np.uint64(a.data.ptr)
    if hasattr(a, "data_ptr"):
        return np.uint64(a.data_ptr())
    raise TypeError(f"cannot take a device pointer of {type(a).__name__}")


def _dtype_code(dtype) -> int:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name == "uint16":  # bf16 bit patterns
        name = "bfloat16"
    if name not in K.DTYPE_CODES:
        raise BadInputError(f"unsupported dtype {dtype!r} (float16, bfloat16 or float32)")
    return K.DTYPE_CODES[name]


def _upload(a: np.ndarray | None, dtype) -> cp.ndarray | None:
    """Host -> device without an intermediate host copy (``a`` may be a view of an mmap)."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype != np.dtype(dtype):
        a = a.view(dtype) if a.dtype.itemsize == np.dtype(dtype).itemsize else a.astype(dtype)
    return cp.asarray(np.ascontiguousarray(a).reshape(-1))


@dataclass
class TileLayout:
    """Device arrays of the GPU tile layout (see :mod:`spqr_format.gpu.tile_layout`)."""

    codes: cp.ndarray  # u32 [NC, RB, SLABS, 32, 4] (chunk-major)
    stats: cp.ndarray  # u32 [NC, RB, 32, SWL]
    stats2: cp.ndarray  # u32 [NC, RB, MPC, 2]
    outlier_entries: cp.ndarray | None  # u32 [E], values f16(o - w)
    RB: int
    NC: int
    KT: int
    MPC: int  # groups (mma k-steps) per chunk
    plans: dict = field(default_factory=dict)  # (device, nt) -> (splits, chunks per split)

    @property
    def nbytes(self) -> int:
        arrs = (self.codes, self.stats, self.stats2, self.outlier_entries)
        return sum(a.nbytes for a in arrs if a is not None)


def build_tile_layout(p: RowLayout, codes_dev, stats_dev, stats2_dev) -> TileLayout | None:
    """Repack ``p`` for the tensor-core kernels (on the GPU, from its already uploaded
    sections), or None when it has no such path (the reason is logged at debug level)."""
    from spqr_format.gpu import tile_layout as TL

    why = TL.ineligible_reason(p)
    if why is None and not TL.stats_range_ok(p):
        why = "statistics too large for f16 fragments"
    oent = None
    if why is None:
        oent, dmax = TL.outlier_corrections(p)
        if not dmax < 60000.0:
            why = "an outlier correction o - w does not fit f16"
    if why is not None:
        K.log.debug("spqr_format.gpu: no tensor-core path: %s", why)
        return None
    m, n = p.shape
    prm = p.params
    geo = TL.geometry(m, n, prm.bits, prm.stats_bits)
    codes = TL.repack_codes(cp, codes_dev.reshape(m, -1), m, n, prm.bits)
    stats, stats2 = TL.repack_stats(
        cp,
        stats_dev.reshape(m, -1),
        stats2_dev,
        m,
        n,
        prm.bits,
        prm.stats_bits,
        prm.stats_group_size,
    )
    return TileLayout(
        codes=cp.ascontiguousarray(codes).reshape(-1),
        stats=cp.ascontiguousarray(stats).reshape(-1),
        stats2=cp.ascontiguousarray(stats2).reshape(-1),
        outlier_entries=None if oent is None else cp.asarray(oent),
        RB=geo["RB"],
        NC=geo["NC"],
        KT=geo["KT"],
        MPC=geo["MPC"],
    )


class _DeviceMatrix:
    """What :class:`GpuTensor` and :class:`~spqr_format.gpu.cmpq.GpuCmpqTensor` share: ``m`` and
    ``n`` from ``shape``, :meth:`dequantize` through ``dequantize_into`` and :meth:`matvec`
    through ``matmul``."""

    @property
    def m(self) -> int:
        return self.shape[0]

    @property
    def n(self) -> int:
        return self.shape[1]

    def dequantize(self, dtype: str | None = None, out=None):
        """Dense ``W[m, n]`` (original column order), bit-exact with SPEC section 7 (bilevel) or
        C-12.7 (channel_mixed).

        ``dtype``: "float16", "bfloat16" (returned as uint16 bit patterns when ``out`` is not
        given, since CuPy has no bfloat16) or "float32". ``out``: optional device buffer
        (CuPy array, torch tensor or pointer) of ``m * n`` elements.
        """
        dtype = dtype or self.dtype
        oc = _dtype_code(dtype)
        m, n = self.shape
        if out is None:
            out = cp.empty((m, n), dtype=np.float32 if oc == 0 else np.uint16)
            if oc == 1:
                out = out.view(np.float16)
        self.dequantize_into(_ptr(out), n, oc)
        return out

    def matvec(self, x, out=None):
        """``y = W x`` for ``x`` of shape ``[n]`` (a CuPy array of a dtype :meth:`matmul`
        takes); returns ``[m]``."""
        if x.ndim != 1:
            raise BadInputError(f"matvec takes x of shape ({self.n},), got {x.shape}")
        y = self.matmul(x.reshape(1, -1), out=None if out is None else out.reshape(1, -1))
        return y.reshape(-1)

    # --- the dense path: dequantize into a workspace, then cuBLAS ------------------------
    def dense_workspace_bytes(self, in_code: int = 1) -> int:
        """Bytes of the dequantized weights the dense path uses (input dtype, 256-aligned)."""
        esz = 4 if in_code == 0 else 2
        return 256 * -(-(self.m * self.n * esz) // 256)

    def _dequantize_gemm(self, x_ptr, ldx, in_code, y_ptr, ldy, out_code, batch, ws_ptr):
        """Dequantize W (bit-exact, in x's dtype) into the workspace (CuPy's pool when
        ``ws_ptr`` is 0), then one cuBLAS GEMM with f32 accumulation on the current stream
        (:func:`gemm_rowmajor`). (Dequantizing and multiplying a few thousand rows at a time,
        so that each slice's GEMM reads its weights from L2, was never faster on an H100 at
        batch 512-2048: a slice's GEMM cannot fill the GPU; gpu-h100-2026-12-07.md.)"""
        m, n = self.shape
        buf = None
        if not int(ws_ptr):
            buf = cp.empty(self.dense_workspace_bytes(in_code) // 2, dtype=np.uint16)
            ws_ptr = buf.data.ptr
        self.dequantize_into(int(ws_ptr), n, in_code)
        gemm_rowmajor(int(x_ptr), int(ldx), in_code, int(ws_ptr), n, int(y_ptr), int(ldy),
                      out_code, batch, m, n, tensor=self.name)  # fmt: skip


@dataclass
class GpuTensor(_DeviceMatrix):
    """A ``bilevel`` tensor whose sections live on the GPU, ready for the kernels."""

    shape: tuple[int, int]
    bits: int
    group_size: int
    stats_bits: int
    stats_group_size: int
    codes: cp.ndarray  # u32 [m * code_row_words] (row layout, codec/row_layout.py)
    stats: cp.ndarray  # u32 (sb = 0: f16 pairs; sb > 0: padded rows)
    stats2: cp.ndarray | None  # u16 [T * G * 4]
    perm: cp.ndarray | None  # u32 [n]
    outlier_rows: cp.ndarray | None  # u32 [m + 1]
    outlier_entries: cp.ndarray | None  # u32 [E]
    dtype: str = "float16"  # the tensor's default decode dtype
    name: str | None = None
    tc: TileLayout | None = None  # tensor-core tile layout (f16 matvec / matmul)
    # inverse permutation (inv_perm[perm[j]] = j): lets the dequantizer stage rows in stored
    # order and gather them on the way out with coalesced index loads
    inv_perm: cp.ndarray | None = None
    # u16 [n] (n <= 65536): the two-row dequantizer's staging position of each output column,
    # pair_slot(inv_perm[c]) (spqr_gpu.h)
    dq2_slots: cp.ndarray | None = None
    # (device, batch, in_code, SPQR_GPU_PLAN) -> launch-plan decision: plan_for runs up to three
    # times per call of a layer (~7 us each in Python), the same answer every decode step
    _decisions: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_packed(
        cls,
        p: PackedBilevel,
        *,
        validate: bool = True,
        name: str | None = None,
        tensor_cores: bool | None = None,
    ) -> GpuTensor:
        """Upload the sections of ``p`` as they are (views of a mapped file upload directly).
        A ``channel_mixed`` tensor gives a :class:`spqr_format.gpu.cmpq.GpuCmpqTensor` (same
        ``dequantize`` / ``matvec`` / ``matmul`` / ``matmul_into`` interface).

        ``validate`` runs the data checks of SPEC C-5.7/5.8/6.1/6.2 first (the kernels trust
        their input: an invalid perm or outlier column would read out of bounds).
        ``tensor_cores`` (default: on unless ``SPQR_GPU_PLAN`` has ``tc=0``) also builds the
        tile layout when the configuration has a tensor-core path; it costs one more copy of
        the codes and statistics on the GPU.
        """
        from spqr_format.codec.channel_mixed import PackedChannelMixed

        if isinstance(p, PackedChannelMixed):  # CMPQ: its own kernels and layout
            from spqr_format.gpu.cmpq import GpuCmpqTensor

            return GpuCmpqTensor.from_packed(p, validate=validate, name=name)
        # The kernels read the row layout (16-byte aligned rows, u32 perm, per-row outlier
        # offsets), built here from the file's dense sections, after the data checks.
        p = to_row_layout(p, validate=validate)
        prm = p.params
        has_out = p.header.has_outliers and p.outlier_entries is not None
        from spqr_format.spec import DTYPE_NAMES

        t = cls(
            shape=tuple(p.shape),
            bits=prm.bits,
            group_size=prm.group_size,
            stats_bits=prm.stats_bits,
            stats_group_size=prm.stats_group_size,
            codes=_upload(p.codes, np.uint32),
            stats=_upload(p.stats, np.uint32) if prm.stats_bits else _upload_pairs(p.stats),
            stats2=_upload(p.stats2, np.uint16) if prm.stats_bits else None,
            perm=_upload(p.perm, np.uint32),
            outlier_rows=_upload(p.outlier_rows, np.uint32) if has_out else None,
            outlier_entries=_upload(p.outlier_entries, np.uint32) if has_out else None,
            dtype=DTYPE_NAMES[p.dtype],
            name=name,
        )
        if t.perm is not None:
            t.inv_perm = cp.empty_like(t.perm)
            t.inv_perm[t.perm] = cp.arange(t.perm.size, dtype=cp.uint32)
            if t.perm.size <= 65536:
                t.dq2_slots = (t.inv_perm ^ ((t.inv_perm >> 3) & 0x1C)).astype(cp.uint16)
        if bool(P.option("tc", 1)) if tensor_cores is None else tensor_cores:
            t.tc = build_tile_layout(p, t.codes, t.stats, t.stats2)
        return t

    @classmethod
    def from_file(
        cls,
        path,
        name: str,
        *,
        verify_crc: bool = True,
        validate: bool = True,
        tensor_cores: bool | None = None,
    ):
        """Upload tensor ``name`` of a ``.spqr`` file (mmap -> device, no host copy)."""
        from spqr_format.api import open_file

        with open_file(path) as f:
            p = f.read(name, verify_crc=verify_crc)
            from spqr_format.codec.channel_mixed import PackedChannelMixed

            if not isinstance(p, (PackedBilevel, PackedChannelMixed)):
                raise BadInputError(
                    f"tensor {name!r} is neither bilevel- nor channel_mixed-encoded", tensor=name
                )
            return cls.from_packed(p, validate=validate, name=name, tensor_cores=tensor_cores)

    # --- geometry ---------------------------------------------------------------------------
    @property
    def geometry(self) -> BilevelGeometry:
        from spqr_format.codec.bilevel import BilevelParams

        prm = BilevelParams(self.bits, self.group_size, self.stats_bits, self.stats_group_size)
        return BilevelGeometry.of(self.shape, prm)

    @property
    def nbytes(self) -> int:
        """Device bytes of the sections (what a matvec streams)."""
        arrs = (
            self.codes,
            self.stats,
            self.stats2,
            self.perm,
            self.outlier_rows,
            self.outlier_entries,
        )
        return sum(a.nbytes for a in arrs if a is not None)

    def matvec_supported(self) -> bool:
        return self.tc is not None or K.matvec_supported(self.bits, self.group_size)

    # --- dequantize -------------------------------------------------------------------------
    def _layout_args(self) -> tuple:
        """The trailing kernel arguments that describe the SPEC layout (spqr_gpu.h: g, S, sb,
        G, code and statistics words per row), shared by the dequantizers and SIMT matvecs."""
        geo = self.geometry
        return (
            np.int32(self.group_size),
            np.int32(max(self.stats_group_size, 1)),
            np.int32(self.stats_bits),
            np.int32(geo.groups),
            np.int64(row_words(self.n, self.bits)),
            np.int64(row_words(2 * geo.groups, self.stats_bits) if self.stats_bits else 0),
        )

    def dequantize_into(self, out_ptr, ldo: int, out_code: int) -> None:
        """Raw-pointer form (for other frameworks): launches on CuPy's current stream."""
        m, n = self.shape
        esz = 4 if out_code == 0 else 2
        layout = self._layout_args()
        out = (np.uint64(out_ptr), np.int64(ldo))
        # the sections every dequantizer reads first
        codes = (self.codes, self.stats, _ptr(self.stats2))
        outliers = (_ptr(self.outlier_rows), _ptr(self.outlier_entries))

        def launch(name: str, blocks: int, threads: int, smem: int, *args) -> None:
            fn = function(name)
            _raise_smem_limit(fn, smem, self.name, name)
            fn((blocks,), (threads,), args, shared_mem=smem)

        # Without a permutation (f16/bf16, specialised bits, g % 16 == 0) the octet kernel
        # writes rows straight to global memory. With one, rows are staged in shared memory in
        # stored order and gathered through inv_perm on the way out (two rows per block when
        # they fit, else one). Outliers and the permutation are applied in the same launch.
        if self.perm is None and K.dequant_oct_supported(self.bits, self.group_size, out_code, n):
            # two rows per block, 8 columns per lane, straight to global memory
            threads = K.dequant_oct_geometry(n)
            smem = K.dequant_oct_smem(self.bits, self.stats_bits, threads)
            name = K.dequant_oct_name(self.bits, self.stats_bits, out_code)
            launch(
                name,
                (m + 1) // 2,
                threads,
                smem,
                *codes,
                *outliers,
                *out,
                np.int64(m),
                np.int64(n),
                *layout,
            )
            return
        smem2 = K.dequant_row2_smem(n)
        if (
            self.dq2_slots is not None
            and K.dequant_row2_supported(self.bits, self.group_size, out_code)
            and smem2 <= min(_smem_optin(), K.DQ2_WIDE_SMEM_MAX)
        ):
            # two rows per block, staged as (row 0, row 1) pairs: one gather serves both rows
            name = K.dequant_row2_name(self.bits, self.stats_bits, out_code)
            launch(
                name,
                (m + 1) // 2,
                K.dequant_row2_threads(n, smem2),
                smem2,
                *codes,
                self.dq2_slots,
                *outliers,
                *out,
                np.int64(m),
                np.int64(n),
                *layout,
            )
            return
        direct = self.perm is None and int(out_ptr) % 16 == 0 and (ldo * esz) % 16 == 0
        if direct or n * esz <= _smem_optin():
            # one row per block (no shared memory when direct)
            smem = 0 if direct else n * esz
            name = K.dequant_row_name(self.bits, self.stats_bits, out_code)
            launch(
                name,
                m,
                K.dequant_row_geometry(n, smem),
                smem,
                *codes,
                _ptr(self.perm),
                _ptr(self.inv_perm),
                *outliers,
                *out,
                np.int64(n),
                np.int32(self.bits),
                *layout,
            )
            return
        # rows beyond shared memory: flat dense pass, then the outlier pass
        name = K.dequant_name(self.bits, self.stats_bits, out_code)
        launch(
            name,
            -(-m * K.nsub_of(n) // 256),
            256,
            0,
            *codes,
            _ptr(self.perm),
            *out,
            np.int64(m),
            np.int64(n),
            np.int32(self.bits),
            *layout,
        )
        if self.outlier_rows is not None:
            launch(
                K.dequant_outliers_name(out_code),
                (m + 7) // 8,
                256,
                0,
                *outliers,
                _ptr(self.perm),
                *out,
                np.int64(m),
            )

    # --- matvec / matmul ----------------------------------------------------------------------
    def plan_for(self, batch: int, in_code: int = 1) -> P.Decision:
        """The launch plan's path for a matmul of ``batch`` rows of dtype code ``in_code``
        (1: f16, 2: bf16) on the current device."""
        key = (cp.cuda.runtime.getDevice(), batch, in_code, P.override_text())
        d = self._decisions.get(key)
        if d is None:
            layout = P.layout_of(
                self.tc is not None, K.matvec_supported(self.bits, self.group_size), in_code
            )
            d = P.decide(_gpu_class(), layout, self.m, self.n, batch)
            if len(self._decisions) < 1024:  # batches seen by one layer: few in practice
                self._decisions[key] = d
        return d

    def workspace_bytes(self, batch: int, in_code: int = 1) -> int:
        """Workspace of :meth:`matmul_into` for ``batch`` rows of dtype code ``in_code``: the
        dequantized weights when the plan takes the ``dense`` path, else the fused kernels'."""
        if self.plan_for(batch, in_code).path == "dense":
            return self.dense_workspace_bytes(in_code)
        old = 4 * K.workspace_floats(self.n, batch, self.m)[2]
        if self.tc is None:
            return old
        nt = K.tc_nt(min(batch, K.TC_MAX_BATCH))
        splits, _ = self._tc_plan(nt)
        need = max(old, K.tc_workspace_bytes(self.m, self.n, self.tc.KT, batch, splits))
        return need

    def _tc_plan(self, nt: int) -> tuple[int, int]:
        """(splits, chunks per split) for ``nt`` n-tiles on this device (computed once: it
        queries the kernel's register count, which is not free on every call)."""
        key = (cp.cuda.Device().id, nt)
        plan = self.tc.plans.get(key)
        if plan is None:
            fn = function(K.tc_name(self.bits, self.stats_bits, nt))
            tc = self.tc
            regs = int(getattr(fn, "num_regs", 64) or 64)
            resident = K.tc_resident_blocks(regs, K.tc_smem_bytes(nt, tc.MPC))
            chunk_bytes = (tc.codes.nbytes + tc.stats.nbytes + tc.stats2.nbytes) // (tc.NC * tc.RB)
            plan = K.tc_splits(tc.RB, tc.NC, _sm_count(), resident, nt, chunk_bytes)
            tc.plans[key] = plan
        return plan

    def _tcv_plan(self) -> int:
        """log2 of the k-slices per row block of the batch <= 8 kernel on this device."""
        key = (cp.cuda.Device().id, "v")
        plan = self.tc.plans.get(key)
        if plan is None:
            fn = function(K.tcv_name(self.bits, self.stats_bits))
            regs = int(getattr(fn, "num_regs", 64) or 64)
            smem = K.TCV_SMEM
            resident = K.tc_resident_blocks(regs, smem)
            plan = self.tc.plans[key] = K.tcv_ks(self.tc.RB, self.tc.NC, _sm_count(), resident)
        return plan

    def matmul(self, X, out=None, workspace=None):
        """``Y = X W^T`` for ``X`` of shape ``[batch, n]`` (the ``nn.Linear`` convention)."""
        if X.ndim != 2 or X.shape[1] != self.n:
            raise BadInputError(f"X must have shape (batch, {self.n}), got {X.shape}")
        X = cp.ascontiguousarray(X)
        batch = X.shape[0]
        code = _dtype_code(X.dtype)
        if code == 0:
            raise BadInputError("x must be float16 or bfloat16 (uint16 bit patterns)")
        if out is None:
            out = cp.empty((batch, self.m), dtype=X.dtype)
        if workspace is None:
            workspace = cp.empty(-(-self.workspace_bytes(batch, code) // 4), dtype=np.float32)
        self.matmul_into(_ptr(X), self.n, code, _ptr(out), self.m, code, batch, _ptr(workspace))
        return out

    def matmul_into(self, x_ptr, ldx, in_code, y_ptr, ldy, out_code, batch, ws_ptr) -> None:
        """Raw-pointer form: ``Y[b, :] = W X[b, :]`` on CuPy's current stream, no allocation
        (``ws_ptr``: :meth:`workspace_bytes` bytes for this batch and ``in_code``; 0 lets the
        dense path allocate from CuPy's pool). The path is the launch plan's
        (:meth:`plan_for`)."""
        m, n = self.shape
        if batch < 1:
            return
        if in_code not in (1, 2):
            raise BadInputError("x must be float16 or bfloat16 (uint16 bit patterns)")
        d = self.plan_for(batch, in_code)
        if d.path == "dense":
            self._dense(x_ptr, ldx, in_code, y_ptr, ldy, out_code, batch, ws_ptr, d)
            return
        if d.path in ("tcg", "tcv", "tc_split"):
            self._tc_matmul(x_ptr, ldx, y_ptr, ldy, out_code, batch, ws_ptr, d)
            return
        ldxs, ldx16, _ = K.workspace_floats(n, batch)
        xs = int(ws_ptr)
        x16 = xs + 4 * batch * ldxs
        nsub = K.nsub_of(n)
        function("spqr_prepare_x")(
            ((32 * nsub + 255) // 256, batch),
            (256,),
            (
                np.uint64(x_ptr),
                np.int64(ldx),
                np.int32(in_code),
                _ptr(self.perm),
                np.int32(self.bits),
                np.int64(n),
                np.uint64(xs),
                np.int64(ldxs),
                np.uint64(x16),
                np.int64(ldx16),
                np.int32(batch),
            ),
        )
        common_tail = self._layout_args()
        if batch == 1:  # plan path mv1
            # row-sweep kernel (outliers and rounding included); with several column splits a
            # small kernel adds the splits' partial sums
            part = x16 + 4 * ldx16
            tall, rows, nsplit, threads = K.mv1_plan(m, n)
            function(K.mv1_name(self.bits, self.stats_bits, tall))(
                (-(-m // rows), nsplit),
                (threads,),
                (
                    self.codes,
                    self.stats,
                    _ptr(self.stats2),
                    _ptr(self.outlier_rows),
                    _ptr(self.outlier_entries),
                    np.uint64(xs),
                    np.uint64(x16),
                    np.uint64(part),
                    np.uint64(y_ptr),
                    np.int32(out_code),
                    np.int64(m),
                    np.int64(n),
                    *common_tail,
                ),
            )
            if nsplit > 1:
                function("spqr_mv1_finish")(
                    (-(-m // 256),),
                    (256,),
                    (
                        np.uint64(part),
                        np.int32(nsplit),
                        np.uint64(y_ptr),
                        np.int32(out_code),
                        np.int64(m),
                    ),
                )
            return
        nb, grid, block = K.matvec_geometry(
            m, n, batch, _sm_count(), outliers=self.outlier_rows is not None
        )
        function(K.matvec_name(self.bits, self.stats_bits, nb))(
            grid,
            (block,),
            (
                self.codes,
                self.stats,
                _ptr(self.stats2),
                _ptr(self.outlier_rows),
                _ptr(self.outlier_entries),
                np.uint64(xs),
                np.int64(ldxs),
                np.uint64(x16),
                np.int64(ldx16),
                np.uint64(y_ptr),
                np.int64(ldy),
                np.int32(out_code),
                np.int64(m),
                np.int64(n),
                *common_tail,
                np.int32(batch),
            ),
        )

    def _tc_matmul(self, x_ptr, ldx, y_ptr, ldy, out_code, batch, ws_ptr, d) -> None:
        """Tensor-core path, per slice of 64 batch columns: prepare the x' fragments, then for
        <= 8 columns one kernel (spqr_tcv_*, or spqr_tcg_* for <= 2 on large matrices: product,
        outlier corrections, rounding), else the k-split tile kernel and the finish kernel
        (split sums, outlier corrections, rounding). ``d``: the plan's decision for the whole
        batch; a slice narrower than ``batch`` takes the plan's choice for its width unless the
        decision came from the override."""
        tc = self.tc
        m, n = self.shape
        m16 = 16 * tc.RB
        ysz = 4 if out_code == 0 else 2
        for b0 in range(0, batch, K.TC_MAX_BATCH):
            nb = min(K.TC_MAX_BATCH, batch - b0)
            nt = K.tc_nt(nb)
            splits, per = self._tc_plan(nt)
            xfrag = int(ws_ptr)
            xt_off, part_off, _ = K.tc_workspace_layout(m, n, tc.KT, nb, splits)
            xt, part = xfrag + xt_off, xfrag + part_off
            bp = K.tc_xt_pitch(nb)
            xb = int(x_ptr) + 2 * b0 * int(ldx)
            yb = int(y_ptr) + ysz * b0 * int(ldy)
            total = nt * tc.KT * 32
            path = d.path
            if nb != batch and d.entry >= 0:
                path = P.decide(_gpu_class(), "tc", m, n, nb).path
            if path not in ("tcg", "tcv", "tc_split") or not P.can_run(path, "tc", nb):
                path = "tc_split"  # e.g. a forced one-kernel path on a slice too wide for it
            tcv = path in ("tcv", "tcg")
            tcg = path == "tcg"
            function("spqr_tc_prepare_x")(
                (-(-total // 256),),
                (256,),
                (
                    np.uint64(xb),
                    np.int64(ldx),
                    _ptr(self.perm),
                    np.int64(n),
                    np.int32(nb),
                    np.int32(nt),
                    np.int64(tc.KT),
                    np.uint64(xfrag),
                    np.uint64(xt),
                    np.int32(bp),
                    np.int32(1 if tcg else 0),
                    np.uint64(part if tcg else 0),
                ),
            )
            if tcv:  # one kernel: outliers, rounding, no partial sums
                ks = self._tcv_plan()
                head = (tc.codes, tc.stats, tc.stats2, np.uint64(xfrag))
                tail = (
                    _ptr(self.outlier_rows),
                    _ptr(tc.outlier_entries),
                    np.uint64(xt),
                    np.int32(bp),
                    np.int32(tc.RB),
                    np.int32(tc.NC),
                    np.int32(ks),
                )
                if tcg:  # group sums of x' in the partial-sums region
                    fv = function(K.tcg_name(self.bits, self.stats_bits))
                    args = (*head, np.uint64(part), *tail)
                else:
                    fv = function(K.tcv_name(self.bits, self.stats_bits))
                    args = (*head, *tail, np.int32(K.tcv_gp_log2(nb)))
                fv(
                    (-(-tc.RB // (K.TC_WARPS >> ks)),),
                    (32 * K.TC_WARPS,),
                    (
                        *args,
                        np.int64(m),
                        np.int32(nb),
                        np.uint64(yb),
                        np.int64(ldy),
                        np.int32(out_code),
                    ),
                )
                continue
            fmain = function(K.tc_name(self.bits, self.stats_bits, nt))
            msmem = K.tc_smem_bytes(nt, tc.MPC)
            _raise_smem_limit(fmain, msmem, self.name, K.tc_name(self.bits, self.stats_bits, nt))
            fmain(
                (-(-tc.RB // K.TC_WARPS), splits),
                (32 * K.TC_WARPS,),
                (
                    tc.codes,
                    tc.stats,
                    tc.stats2,
                    np.uint64(xfrag),
                    np.uint64(part),
                    np.int32(tc.RB),
                    np.int32(tc.NC),
                    np.int32(per),
                    np.int64(m16),
                    np.int32(nb),
                ),
                shared_mem=msmem,
            )
            self._tc_finish(part, splits, 8 * nt, xt, bp, yb, ldy, out_code, nb)

    def _tc_finish(self, part, splits, ncols, xt, bp, yb, ldy, out_code, nb) -> None:
        """The k-split paths' finish kernel (spqr_tc_finish_p*) for one slice of ``nb`` columns:
        the ``splits`` partial sums of ``ncols`` columns in order, plus the outlier corrections
        from x'^T (pitch ``bp``), rounded to ``out_code`` into ``yb``."""
        tc = self.tc
        m, n = self.shape
        m16 = 16 * tc.RB
        xbytes = 16 * -(-(n * bp * 2) // 16)
        smem_x = self.outlier_rows is not None and nb <= 8 and xbytes <= K.TC_FINISH_SMEM_MAX
        # lanes per row: 32 (one row per warp) or fewer (several rows per warp)
        ents = 0 if tc.outlier_entries is None else int(tc.outlier_entries.size)
        lanes = K.tc_finish_lanes(bp, m, ents, _sm_count())
        rows_grid = -(-m // (256 // lanes))
        fname = K.tc_finish_name(bp)
        fin = function(fname)
        smem = 0
        grid = rows_grid
        if smem_x:
            smem = xbytes
            _raise_smem_limit(fin, smem, self.name, fname)
            per_sm = max(1, min(8, (227 * 1024) // (smem + 1024)))
            grid = min(rows_grid, per_sm * _sm_count())
        fin(
            (grid,),
            (256,),
            (
                np.uint64(part),
                np.int32(splits),
                np.int64(m16),
                np.int32(ncols),
                _ptr(self.outlier_rows),
                _ptr(tc.outlier_entries),
                np.uint64(xt),
                np.int32(bp),
                np.int32(1 if smem_x else 0),
                np.int32(lanes),
                np.int64(n),
                np.uint64(yb),
                np.int64(ldy),
                np.int32(out_code),
                np.int64(m),
                np.int32(nb),
            ),
            shared_mem=smem,
        )

    def _dense(self, x_ptr, ldx, in_code, y_ptr, ldy, out_code, batch, ws_ptr, d) -> None:
        """The ``dense`` path: the reason logged once, then :meth:`_dequantize_gemm`."""
        m, n = self.shape
        fused = K.matvec_supported(self.bits, self.group_size) or self.tc is not None
        key = (self.name, self.shape, self.bits, self.group_size, self.stats_bits, d.reason)
        if key not in _noticed:
            _noticed.add(key)
            if not fused:
                K.log.warning(
                    "spqr_format.gpu: tensor %s: no fused matmul for bits=%d group_size=%d "
                    "(fused kernels: bits in %s, group_size a multiple of 16); using "
                    "dequantize + cuBLAS",
                    self.name or "?",
                    self.bits,
                    self.group_size,
                    K.MATVEC_BITS,
                )
            else:
                K.log.info(
                    "spqr_format.gpu: tensor %s (%dx%d): batch %d -> dequantize + cuBLAS "
                    "(launch plan: %s)",
                    self.name or "?",
                    m,
                    n,
                    batch,
                    d.reason,
                )
        self._dequantize_gemm(x_ptr, ldx, in_code, y_ptr, ldy, out_code, batch, ws_ptr)


_CUDA_TYPES = {0: 0, 1: 2, 2: 14}  # dtype code -> cudaDataType (R_32F, R_16F, R_16BF)
_ONE = np.ones(1, dtype=np.float32)
_ZERO = np.zeros(1, dtype=np.float32)
INT32_MAX = 2**31 - 1


def gemm_rowmajor(
    x_ptr, ldx, in_code, w_ptr, ldw, y_ptr, ldy, out_code, batch, m, n, tensor=None
) -> None:
    """``Y[batch, m] = X[batch, n] W[m, n]^T`` (row-major, X and W in dtype ``in_code``, Y in
    ``out_code``) by cublasGemmEx with f32 accumulation (CUBLAS_COMPUTE_32F) on CuPy's current
    stream. cuBLAS writes f32 or the input's dtype; another output dtype (f16 <-> bf16, f32 x
    to f16/bf16) goes through an f32 product rounded once to nearest-even. Raises
    :class:`BadInputError` naming ``tensor`` when a dimension passes cuBLAS's 32-bit limit."""
    from cupy_backends.cuda.libs import cublas

    for what, v in (("rows", m), ("columns", n), ("batch", batch), ("ldx", ldx), ("ldy", ldy)):
        if v > INT32_MAX:
            raise BadInputError(
                f"{what} = {v} exceeds cuBLAS's limit {INT32_MAX}",
                tensor=tensor,
            )
    if cp.cuda.get_current_stream().is_capturing():
        # CuPy refuses every cuBLAS call while a stream is being captured (it would set the
        # handle's stream); torch's cuBLAS wrapper is capture-safe, so inside a CUDA graph the
        # same product runs through torch on the capturing stream.
        _gemm_rowmajor_captured(x_ptr, ldx, in_code, w_ptr, ldw, y_ptr, ldy, out_code,
                                batch, m, n, tensor)  # fmt: skip
        return
    if out_code not in (in_code, 0):
        y32 = cp.empty((batch, m), dtype=np.float32)
        gemm_rowmajor(x_ptr, ldx, in_code, w_ptr, ldw, y32.data.ptr, m, 0, batch, m, n, tensor)
        mem = cp.cuda.UnownedMemory(int(y_ptr), 2 * ((batch - 1) * ldy + m), owner=None)
        y = cp.ndarray((batch, ldy), dtype=np.uint16, memptr=cp.cuda.MemoryPointer(mem, 0))
        _round_f32(out_code, y32, y[:, :m])
        return
    # column-major view: Y^T (m x batch, ld ldy) = W^T' (W stored n x m, ld ldw)^T X^T
    handle = cp.cuda.device.get_cublas_handle()
    cublas.gemmEx(
        handle,
        cublas.CUBLAS_OP_T,
        cublas.CUBLAS_OP_N,
        m,
        batch,
        n,
        _ONE.ctypes.data,
        w_ptr,
        _CUDA_TYPES[in_code],
        ldw,
        x_ptr,
        _CUDA_TYPES[in_code],
        ldx,
        _ZERO.ctypes.data,
        y_ptr,
        _CUDA_TYPES[out_code],
        ldy,
        68,  # CUBLAS_COMPUTE_32F
        -1,  # CUBLAS_GEMM_DEFAULT
    )


@functools.cache
def _bf16_rounding():
    """Elementwise f32 -> bf16 bits, round to nearest even, a NaN kept a (quiet) NaN."""
    return cp.ElementwiseKernel(
        "float32 x",
        "uint16 y",
        "unsigned int u = __float_as_uint(x);"
        " y = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40u)"
        " : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);",
        "spqr_round_f32_bf16",
    )


def _round_f32(out_code: int, y32, y16) -> None:
    """``y16`` (uint16 bit patterns) = ``y32`` rounded to f16 (1) or bf16 (2), to nearest
    even; a NaN stays a NaN."""
    if out_code == 1:
        y16.view(np.float16)[...] = y32
    else:
        _bf16_rounding()(y32, y16)


_NP_TYPES = {0: np.float32, 1: np.float16, 2: np.uint16}  # bf16 travels as its bits


def _gemm_rowmajor_captured(x_ptr, ldx, in_code, w_ptr, ldw, y_ptr, ldy, out_code, batch, m, n,
                            tensor) -> None:  # fmt: skip
    """:func:`gemm_rowmajor` inside CUDA-graph capture: torch.matmul on zero-copy views of
    the same buffers, launched on the capturing stream. Needs torch, and the output in the
    input's dtype (torch's GEMM has no mixed-dtype output); anything else is refused with a
    clear error instead of breaking the capture."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or in_code != out_code:
        raise BadInputError(
            "dequantize + cuBLAS cannot run inside CUDA-graph capture "
            + ("without torch" if torch is None else "with an output dtype other than the "
               "input's")
            + f" (batch {batch}); capture a batch the fused kernels serve, or run it eagerly",
            tensor=tensor,
        )  # fmt: skip

    def view(ptr, rows, ld, cols):
        dt = np.dtype(_NP_TYPES[in_code])
        mem = cp.cuda.UnownedMemory(int(ptr), rows * ld * dt.itemsize, owner=None)
        a = cp.ndarray((rows, ld), dtype=dt, memptr=cp.cuda.MemoryPointer(mem, 0))[:, :cols]
        t = torch.as_tensor(a, device="cuda")
        return t.view(torch.bfloat16) if in_code == 2 else t

    stream = torch.cuda.ExternalStream(cp.cuda.get_current_stream().ptr)
    with torch.cuda.stream(stream):
        x, w, y = view(x_ptr, batch, ldx, n), view(w_ptr, m, ldw, n), view(y_ptr, batch, ldy, m)
        torch.matmul(x, w.t(), out=y)


_gpu_classes: dict[int, str] = {}


def _gpu_class() -> str:
    """The launch plan's GPU class of the current device."""
    dev = cp.cuda.Device()
    c = _gpu_classes.get(dev.id)
    if c is None:
        cc = int(dev.compute_capability)
        c = _gpu_classes[dev.id] = P.gpu_class(cc, _sm_count())
    return c


def _device_attr(name: str) -> int:
    dev = cp.cuda.Device()
    key = (dev.id, name)
    v = _attrs.get(key)
    if v is None:
        v = _attrs[key] = int(dev.attributes[name])
    return v


_attrs: dict[tuple[int, str], int] = {}


def _sm_count() -> int:
    return _device_attr("MultiProcessorCount")


def _smem_optin() -> int:
    """Dynamic shared memory a block may use (opt-in limit), minus the static reserve."""
    return _device_attr("MaxSharedMemoryPerBlockOptin") - 1024


_smem_set: dict[int, int] = {}


def _raise_smem_limit(fn, smem: int, tensor: str | None = None, kernel: str = "") -> None:
    """Opt a kernel in to ``smem`` bytes of dynamic shared memory when that is more than the
    48 KiB every launch may use (once per size); a size above the device's opt-in limit raises
    :class:`BadInputError` naming the tensor, the kernel and the limit."""
    limit = _smem_optin() + 1024
    if smem > limit:
        raise BadInputError(
            f"kernel {kernel or '?'} needs {smem} bytes of shared "
            f"memory per block; this device allows {limit}",
            tensor=tensor,
        )
    if smem > 48 * 1024 and _smem_set.get(id(fn), 0) < smem:
        fn.max_dynamic_shared_size_bytes = smem
        _smem_set[id(fn)] = smem


def _upload_pairs(stats: np.ndarray) -> cp.ndarray:
    """f16 (scale, zero) pairs [m, G, 2] uploaded as u32 words [m * G] (same bytes)."""
    a = np.ascontiguousarray(np.asarray(stats).view(np.uint16))
    return cp.asarray(a.reshape(-1).view(np.uint32))


def _view(ptr, shape, dtype, code):
    """A CuPy view of device memory owned elsewhere (bf16 widened to f32)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    mem = cp.cuda.UnownedMemory(int(ptr), nbytes, owner=None)
    arr = cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))
    if code == 2:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _store(ys, y_ptr, ldy, out_code, batch, m) -> None:
    if out_code == 2:
        y32 = ys.astype(np.float32)
        bits = y32.view(np.uint32)
        # round to nearest even into bf16 (finite inputs; NaN kept as NaN)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        out = _view(y_ptr, (batch, ldy), np.uint16, 1)
        out[:, :m] = rounded.astype(np.uint16)
    else:
        out = _view(y_ptr, (batch, ldy), np.float16, 1)
        out[:, :m] = ys.astype(np.float16)
