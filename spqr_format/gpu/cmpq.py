"""CuPy layer for ``channel_mixed`` (CMPQ) tensors: upload, dequantize, fused matvec / matmul.

The sibling of :class:`spqr_format.gpu.tensor.GpuTensor` (which dispatches here for
``channel_mixed`` tensors, so ``GpuTensor.from_packed`` / ``from_file`` accept both). The
kernels are ``kernels/spqr_cmpq.cu`` (contract in ``kernels/spqr_gpu.h``); they read the CMPQ
chunk layout built once at upload by :mod:`spqr_format.codec.cmpq_layout`. Launches go to
CuPy's current stream; nothing synchronises the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spqr_format.codec import channel_mixed as cm
from spqr_format.codec import cmpq_layout as CL
from spqr_format.errors import BadInputError
from spqr_format.gpu import _kernels as K
from spqr_format.gpu.plan import option as plan_option
from spqr_format.gpu.tensor import (
    _DeviceMatrix,
    _dtype_code,
    _noticed,
    _ptr,
    _raise_smem_limit,
    _sm_count,
    _upload,
    compiled,
    cp,
)

_functions: dict[tuple[int, str], object] = {}


def function(name: str):
    key = (cp.cuda.Device().id, name)
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = compiled(K.CMPQ_MODULE).get_function(name)
    return fn


@dataclass
class _Plan:
    """Launches of one (path, nb): ``groups`` are (kernel, first tile, tiles, splits, first
    split) -- one group over all tiles for ``mm``, one per width present for ``mv1`` / ``tc``
    (per-width kernels), each launched on its own with its own range of the partial sums."""

    tiles: object  # cp int64 [ntiles * 8]
    groups: list
    smem: int
    splits: int  # total: the finish kernel's
    rows: int  # rows per block


@dataclass
class GpuCmpqTensor(_DeviceMatrix):
    """A ``channel_mixed`` tensor on the GPU in the CMPQ chunk layout."""

    shape: tuple[int, int]
    table_rows: int
    Lp: int
    np_: int
    runs_host: np.ndarray  # int64 [nruns, 8]
    codes: cp.ndarray
    tables: cp.ndarray
    runs: cp.ndarray
    pcol: cp.ndarray
    perm: cp.ndarray
    inv_perm: cp.ndarray
    orows: cp.ndarray | None = None
    ocol: cp.ndarray | None = None
    ocolp: cp.ndarray | None = None
    oval: cp.ndarray | None = None
    ocorr: cp.ndarray | None = None
    dtype: str = "float16"
    name: str | None = None
    plans: dict = field(default_factory=dict)
    encoding = "channel_mixed"
    tc = None  # no tensor-core layout (benchmarks look for it)

    @classmethod
    def from_packed(
        cls, p: cm.PackedChannelMixed, *, validate: bool = True, name: str | None = None
    ) -> GpuCmpqTensor:
        """Validate (SPEC C-12.8 data checks; the kernels trust their input), repack into the
        chunk layout on the host, upload."""
        from spqr_format.spec import DTYPE_NAMES

        L = CL.to_cmpq_layout(p, validate=validate)
        out = L.has_outliers
        return cls(
            shape=tuple(L.shape),
            table_rows=L.table_rows,
            Lp=L.Lp,
            np_=L.np_,
            runs_host=L.runs,
            codes=_upload(L.codes, np.uint32),
            tables=_upload(L.tables, np.uint16),
            runs=_upload(L.runs, np.int64),
            pcol=_upload(L.pcol, np.uint32),
            perm=_upload(L.perm, np.uint32),
            inv_perm=_upload(L.inv_perm, np.uint32),
            orows=_upload(L.orows, np.uint32) if out else None,
            ocol=_upload(L.ocol, np.uint32) if out else None,
            ocolp=_upload(L.ocolp, np.uint32) if out else None,
            oval=_upload(L.oval, np.uint16) if out else None,
            ocorr=_upload(L.ocorr, np.float32) if out else None,
            dtype=DTYPE_NAMES[L.dtype],
            name=name,
        )

    # --- geometry -----------------------------------------------------------------------
    @property
    def width_counts(self) -> tuple[int, ...]:
        counts = [0] * 8
        for r in self.runs_host.tolist():
            counts[r[2] - 1] = r[1]
        return tuple(counts)

    @property
    def nbytes(self) -> int:
        arrs = (self.codes, self.tables, self.perm, self.orows, self.ocolp, self.ocorr)
        return sum(a.nbytes for a in arrs if a is not None)

    def matvec_supported(self) -> bool:
        return True

    def _plan(self, path: str, nb: int) -> _Plan:
        """Tiles and launches of ``path`` (K.cmpq_path) for ``nb`` batch columns (``tc``: the
        padded batch, 8 or 16): K.cmpq_launches, the tile table uploaded."""
        key = (cp.cuda.Device().id, path, nb)
        plan = self.plans.get(key)
        if plan is None:
            tl, groups, smem, total, rows = K.cmpq_launches(
                self.m, self.runs_host, path, nb, _sm_count()
            )
            plan = _Plan(cp.asarray(tl.reshape(-1)), groups, smem, total, rows)
            self.plans[key] = plan
        return plan

    def _ldxs(self) -> int:
        return 4 * -(-max(self.np_, 1) // 4)

    def _slice(self, nbt: int, in_code: int) -> tuple[str, int, int]:
        """(path, nb, nbp) of a slice of ``nbt`` rows: nb the kernel's batch columns, nbp
        those of x' f32 and of the partial sums (the finish kernel's NB)."""
        return K.cmpq_slice(nbt, in_code, self.table_rows)

    def workspace_bytes(self, batch: int, in_code: int = 1) -> int:
        """Bytes of workspace :meth:`matmul_into` needs for x of dtype code ``in_code``: from
        K.cmpq_dense's batch on the dequantized weights; below it x' (f32 [nbp][ldxs]), for the
        tensor-core path x' as f16 in fragment order (np * nb * 2 bytes), then the partial sums
        (f32 [splits][nbp][m]), for the largest slice of ``batch``."""
        if K.cmpq_dense(batch, in_code):
            return self.dense_workspace_bytes(in_code)
        best = 0
        sizes = {min(batch, K.CMPQ_MAX_BATCH)}
        if batch > K.CMPQ_MAX_BATCH and batch % K.CMPQ_MAX_BATCH:
            sizes.add(batch % K.CMPQ_MAX_BATCH)
        for s in sizes:
            path, nb, nbp = self._slice(s, in_code)
            plan = self._plan(path, nb)
            xf = 2 * self.np_ * nb if path == "tc" else 0
            best = max(best, 4 * nbp * (self._ldxs() + plan.splits * self.m) + xf)
        return best

    # --- dequantize -----------------------------------------------------------------------
    def dequantize_into(self, out_ptr, ldo: int, out_code: int) -> None:
        m, n = self.shape
        oc = K.OUT_NAMES[out_code]
        rpb = K.cmpq_dq_rows_per_block(m)
        function(K.cmpq_dq_name(oc))(
            (-(-n // K.CMPQ_DQ_COLS), -(-m // rpb)),
            (256,),
            (self.codes, self.tables, self.runs, np.int32(self.runs_host.shape[0]),
             self.inv_perm, np.uint64(out_ptr), np.int64(ldo), np.int64(m), np.int64(n),
             np.int64(self.table_rows), np.int64(self.Lp), np.int32(rpb)),
        )  # fmt: skip
        if self.orows is not None:
            function(f"spqr_cmpq_dequant_outliers_{oc}")(
                (-(-m // 8),),
                (256,),
                (self.orows, self.ocol, self.oval, self.perm, np.uint64(out_ptr),
                 np.int64(ldo), np.int64(m)),
            )  # fmt: skip

    # --- matvec / matmul --------------------------------------------------------------------
    def matmul(self, X, out=None, workspace=None):
        """``Y = X W^T`` for ``X`` of shape ``[batch, n]`` (f16, bf16 as uint16, or f32)."""
        if X.ndim != 2 or X.shape[1] != self.n:
            raise BadInputError(f"X must have shape (batch, {self.n}), got {X.shape}")
        X = cp.ascontiguousarray(X)
        batch = X.shape[0]
        code = _dtype_code(X.dtype)
        if out is None:
            out = cp.empty((batch, self.m), dtype=X.dtype)
        if workspace is None:
            ws = self.workspace_bytes(batch, code)
            workspace = cp.empty(max(1, ws // 4), dtype=np.float32)
        self.matmul_into(_ptr(X), self.n, code, _ptr(out), self.m, code, batch, _ptr(workspace))
        return out

    def matmul_into(self, x_ptr, ldx, in_code, y_ptr, ldy, out_code, batch, ws_ptr) -> None:
        """Raw-pointer form: ``Y[b, :] = W X[b, :]`` on CuPy's current stream, no allocation
        (``ws_ptr``: :meth:`workspace_bytes` bytes for ``in_code``; 0 lets the dense path
        allocate from CuPy's pool). Large batches of f16 x (K.cmpq_dense): dequantize W to f16
        into the workspace (bit-exact), then one cuBLAS GEMM. Otherwise per slice of up to 16
        rows: prepare x', the fused kernel(s) (k-split partial sums; K.cmpq_path picks them),
        the finish kernel (sums, outliers, rounding)."""
        m, n = self.shape
        if batch < 1:
            return
        if K.cmpq_dense(batch, in_code):
            self._dense(x_ptr, ldx, in_code, y_ptr, ldy, out_code, batch, ws_ptr)
            return
        xsz = 4 if in_code == 0 else 2
        ysz = 4 if out_code == 0 else 2
        ldxs = self._ldxs()
        for b0 in range(0, batch, K.CMPQ_MAX_BATCH):
            nbt = min(K.CMPQ_MAX_BATCH, batch - b0)
            path, nb, nbp = self._slice(nbt, in_code)
            plan = self._plan(path, nb)
            xs = int(ws_ptr)
            xf = xs + 4 * nbp * ldxs
            part = xf + (2 * self.np_ * nb if path == "tc" else 0)
            x0 = np.uint64(int(x_ptr) + xsz * b0 * int(ldx))
            if path == "tc":
                function("spqr_cmpq_prepare_xf")(
                    (-(-self.np_ // 256), nb),
                    (256,),
                    (x0, np.int64(ldx), self.pcol, np.int64(self.np_), np.uint64(xs),
                     np.int64(ldxs), np.int32(nbp), np.uint64(xf), np.int32(nb // 8),
                     np.int32(nbt)),
                )  # fmt: skip
            else:
                function("spqr_cmpq_prepare_x")(
                    (-(-self.np_ // 256), nbp),
                    (256,),
                    (x0, np.int64(ldx), np.int32(in_code), self.pcol, np.int64(self.np_),
                     np.uint64(xs), np.int64(ldxs), np.int32(nbt)),
                )  # fmt: skip
            for name, first, count, splits, s0 in plan.groups:
                fn = function(name)
                _raise_smem_limit(fn, plan.smem)
                tiles = np.uint64(int(plan.tiles.data.ptr) + 64 * first)
                pg = np.uint64(part + 4 * s0 * nbp * m)
                common = (self.codes, self.tables, tiles, np.int32(count))
                if path == "tc":
                    args = (*common, np.uint64(xf), pg, np.int32(nbp))
                elif path == "mv1":
                    args = (*common, np.uint64(xs), pg)
                else:
                    args = (*common, np.uint64(xs), np.int64(ldxs), pg)
                threads = 128 if path == "tc" else K.CMPQ_ROWS
                fn(
                    (-(-m // plan.rows), splits),
                    (threads,),
                    (*args, np.int64(m), np.int64(self.table_rows), np.int64(self.Lp)),
                    shared_mem=plan.smem,
                )  # fmt: skip
            function(f"spqr_cmpq_finish_nb{nbp}")(
                (-(-m // 8),),
                (256,),
                (np.uint64(part), np.int32(plan.splits), _ptr(self.orows), _ptr(self.ocolp),
                 _ptr(self.ocorr), np.uint64(xs), np.int64(ldxs),
                 np.uint64(int(y_ptr) + ysz * b0 * int(ldy)), np.int64(ldy), np.int32(out_code),
                 np.int64(m), np.int32(nbt)),
            )  # fmt: skip

    def _dense(self, x_ptr, ldx, in_code, y_ptr, ldy, out_code, batch, ws_ptr) -> None:
        """Dequantize W (bit-exact, f16: x's dtype) into the workspace, then one cuBLAS GEMM with
        f32 accumulation on the current stream (as GpuTensor's dense path)."""
        m, n = self.shape
        key = ("cmpq-dense", self.name, self.shape)
        if key not in _noticed:
            _noticed.add(key)
            K.log.info(
                "spqr_format.gpu: channel_mixed tensor %s (%dx%d): batch %d -> dequantize + "
                "cuBLAS (from batch %d)",
                self.name or "?",
                m,
                n,
                batch,
                plan_option("cmpq_dense_from", K.CMPQ_DENSE_FROM),
            )
        self._dequantize_gemm(x_ptr, ldx, in_code, y_ptr, ldy, out_code, batch, ws_ptr)
