"""Quantization over several processes through ``torch.distributed`` (issue 21).

``torchrun --nproc-per-node N -m spqr_format quantize-model ...`` runs the pipeline of
:mod:`spqr_format.models.pipeline` on N ranks: gloo between CPU processes (``--device cpu``,
the numba encoder), NCCL between GPUs (``--device cuda``: rank ``r`` on ``cuda:LOCAL_RANK``,
one rank per GPU, the torch encoder). What each rank does:

- **Calibration windows** are split in fixed *chunks* of :data:`WINDOWS_PER_CHUNK`
  consecutive windows (the partition depends only on the number of windows, never on N);
  chunk ``c`` belongs to rank ``c % N``. A rank runs only its own windows through the
  embeddings and the blocks, so it holds only their activations.
- **Hessians, fixed order.** For every chunk each rank sums ``x x^T`` of the chunk's windows in
  float64 from zero, in window order (CPU: :meth:`HessianAccumulator.add`; GPU: one float64
  GEMM per window on the device, :class:`~spqr_format.codec.gptq_torch.HessianAccumulatorTorch`);
  the chunk sums are then folded into the layer's total *in chunk order*
  ``((S_0 + S_1) + S_2) + ...`` on the rank that encodes the layer (``dist.gather`` of one
  step's N chunk sums, added in rank order = chunk order; on the GPU path in row blocks of at
  most :data:`FOLD_BYTES`, so the owner never holds N whole n x n matrices). The sums are only
  moved, never re-associated. A single process (N=1, no torchrun) runs the very same chunked
  code, on the CPU and on the GPU, so the Hessians, and therefore the file, are bit-for-bit
  the same for every N: on the CPU always; on GPUs when the ranks' GPUs are of one model
  (the same cuBLAS kernels for the same shapes: cuBLAS is deterministic per architecture and
  SM count). Tested: 1 process vs 2 and 3 gloo ranks on the CPU, and the GPU code run on the
  CPU over gloo (2 ranks, small fold pieces); on a GPU, a one-rank NCCL launch vs the plain
  single-process ``--device cuda`` run (tests/test_distributed_gpu.py, which also has the 2-
  and 3-GPU equalities, run only where such a machine is lent).
- **Encoding.** The block's layer ``j`` is encoded by rank ``j % N``; the packed tensors and
  reports are exchanged (``all_gather_object``; under NCCL it pickles through this rank's
  GPU, which :func:`from_env` makes the current device) so that every rank puts the *decoded*
  weights of every layer into its copy of the block before it computes the next block's
  inputs (the GPU encoder's reconstruction equals the decoded tensor bit for bit, tested in
  tests/test_gptq_torch.py, so owner and non-owners hold the same weights).
- **Output.** Rank 0 alone writes the block checkpoints (``OUT.partial/``) and the final file
  (atomically); ``--resume`` reuses them exactly as a single process does (the checkpoints
  are the same bytes, so a run may even be resumed with another N, on the same device kind).
- **Failures.** After every step where a rank computes on its own (forward passes, encoding,
  writing) the ranks exchange a status (:meth:`Group.check`): if any rank raised, every rank
  raises :class:`RankFailed` with that rank's error, exits non-zero, and rank 0 removes
  ``OUT.partial/``; ``OUT`` is only ever written at the very end, atomically. A rank *killed*
  (signal, OOM killer, lost host) cannot report: torchrun stops the others, and
  ``OUT.partial/`` stays for ``--resume``, as after an interrupted single-process run.

A one-rank launch with ``--device cuda`` (``--nproc-per-node 1``) gets a one-rank NCCL group
and runs all of the above (the way the NCCL code is tested on one GPU); a one-rank CPU launch
is a plain single process. Not implemented (refused with a message): ``--target-bits`` under
torchrun (its allocation pass needs every window's activations). Several hosts need ``OUT``'s
directory on rank 0 only (checkpoints are read by rank 0 and broadcast). Every rank loads the
whole model on its CPU (as one process does); each block visits the GPUs while it is
quantized.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

import numpy as np

from spqr_format.codec.hessian import HessianAccumulator
from spqr_format.errors import SpqrError

WINDOWS_PER_CHUNK = 4
FOLD_BYTES = 256 << 20  # the owner's receive buffers per gather of Hessian rows (device path)


def _cpu():
    try:
        import torch
    except ImportError:  # no torch: Group() is only used by the single-process pipeline
        return None
    return torch.device("cpu")


class RankFailed(SpqrError):
    """Another rank (or this one) raised: the whole distributed run stops with its error."""


class Group:
    """The ranks of a run. ``Group()`` is the single process (no torch.distributed); under
    torchrun :func:`from_env` gives a group on the initialised default process group."""

    def __init__(self, dist=None, device=None) -> None:
        self.dist = dist
        self.rank = dist.get_rank() if dist is not None else 0
        self.world = dist.get_world_size() if dist is not None else 1
        # where the collectives' tensors live: this rank's GPU under NCCL, else the CPU
        self.device = device if device is not None else _cpu()

    # -- assignment ---------------------------------------------------------------------
    def chunks(self, n_windows: int) -> int:
        return -(-n_windows // WINDOWS_PER_CHUNK)

    def window_ids(self, n_windows: int) -> list[int]:
        """Global indices of this rank's windows (its chunks, in order)."""
        out = []
        for c in range(self.rank, self.chunks(n_windows), self.world):
            out.extend(range(c * WINDOWS_PER_CHUNK, min((c + 1) * WINDOWS_PER_CHUNK, n_windows)))
        return out

    def owner(self, j: int) -> int:
        """The rank that encodes layer ``j`` of a block (round robin)."""
        return j % self.world

    # -- collectives --------------------------------------------------------------------
    def check(self, err: BaseException | None = None) -> None:
        """Exchange every rank's status; raise the first failed rank's error on all ranks."""
        if self.dist is None:
            if err is not None:
                raise err
            return
        mine = None if err is None else f"{type(err).__name__}: {err}"
        status: list = [None] * self.world
        self.dist.all_gather_object(status, mine)
        failed = [(r, m) for r, m in enumerate(status) if m is not None]
        if failed:
            r, m = failed[0]
            if err is not None and r == self.rank:
                raise RankFailed(f"rank {r} of {self.world} failed: {m}") from err
            raise RankFailed(f"rank {r} of {self.world} failed: {m}")

    def run(self, fn, *, on=None):
        """``fn()`` on rank ``on`` (every rank when None), then :meth:`check`; returns its
        value on the ranks that ran it."""
        err, out = None, None
        if on is None or on == self.rank:
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - reported to every rank by check()
                err = e
        self.check(err)
        return out

    def broadcast(self, obj, src: int = 0):
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=src)
        return box[0]

    def merge(self, mine: dict) -> dict:
        """Union of every rank's dict (each rank contributes the layers it owns)."""
        if self.dist is None:
            return dict(mine)
        parts: list = [None] * self.world
        self.dist.all_gather_object(parts, mine)
        out: dict = {}
        for p in parts:
            out.update(p)
        return out

    def fold(self, torch, total, chunk, n: int, owner: int) -> None:
        """Fold this step's chunk sums of one layer (one per rank, chunk order = rank order)
        into ``total`` on ``owner``. ``total`` / ``chunk``: :class:`HessianAccumulator` (numpy)
        or :class:`~spqr_format.codec.gptq_torch.HessianAccumulatorTorch` (GPU encoder); the
        sums are only moved, never re-associated, so every element of ``total`` is
        ``((S_0 + S_1) + S_2) + ...`` whatever N is."""
        if self.dist is None:
            total.merge(chunk._sum, chunk.tokens)
            return
        if isinstance(chunk, HessianAccumulator) and self.device.type == "cpu":
            self._fold_gloo(torch, total, chunk, n, owner)
            return
        self._fold_pieces(torch, total, chunk, n, owner)

    def _fold_gloo(self, torch, total, chunk, n: int, owner: int) -> None:
        """numpy sums over gloo: one ``gather`` of the whole n x n sums (CPU memory)."""
        s = chunk._sum if chunk._sum is not None else np.zeros((n, n), dtype=np.float64)
        send = torch.from_numpy(np.ascontiguousarray(s))
        toks = torch.tensor([chunk.tokens], dtype=torch.int64)
        if self.rank == owner:
            bufs = [torch.empty((n, n), dtype=torch.float64) for _ in range(self.world)]
            tbufs = [torch.empty(1, dtype=torch.int64) for _ in range(self.world)]
        else:
            bufs = tbufs = None
        self.dist.gather(send, gather_list=bufs, dst=owner)
        self.dist.gather(toks, gather_list=tbufs, dst=owner)
        if self.rank == owner:
            for b, t in zip(bufs, tbufs, strict=True):
                total.merge(b.numpy(), int(t.item()))

    def _fold_pieces(self, torch, total, chunk, n: int, owner: int) -> None:
        """Sums on a torch device (or numpy sums under NCCL, moved to this rank's GPU):
        ``gather`` in row blocks of at most :data:`FOLD_BYTES` over all ranks, so the owner
        holds N row blocks, not N whole n x n matrices (down_proj of a 70B: 6.5 GB each)."""
        dev = self.device
        numpy_sums = isinstance(chunk, HessianAccumulator)
        s = chunk._sum
        if s is None:
            s = torch.zeros((n, n), dtype=torch.float64, device=dev)
        elif numpy_sums:
            s = torch.from_numpy(np.ascontiguousarray(s)).to(dev)
        toks = torch.tensor([chunk.tokens], dtype=torch.int64, device=dev)
        mine = self.rank == owner
        tbufs = [torch.empty(1, dtype=torch.int64, device=dev) for _ in range(self.world)]
        self.dist.gather(toks, gather_list=tbufs if mine else None, dst=owner)
        counts = [int(t.item()) for t in tbufs] if mine else []
        rows = max(1, FOLD_BYTES // (8 * n * self.world))
        for i0 in range(0, n, rows):
            piece = s[i0 : i0 + rows].contiguous()
            bufs = [torch.empty_like(piece) for _ in range(self.world)] if mine else None
            self.dist.gather(piece, gather_list=bufs, dst=owner)
            if not mine:
                continue
            for b, t in zip(bufs, counts, strict=True):
                if t == 0:
                    continue  # a rank past the last chunk: nothing to add (as merge skips it)
                if numpy_sums:
                    if total._sum is None:
                        total._sum = np.zeros((n, n), dtype=np.float64)
                    total._sum[i0 : i0 + rows] += b.cpu().numpy()
                else:
                    total.merge_rows(b, i0)
        if mine:
            total.tokens += sum(counts)


def collect_hessians(torch, group: Group, mods, run_window, window_ids: list[int],
                     n_windows: int, dev=None) -> dict:  # fmt: skip
    """Hessians of ``mods`` (``[(name, layer)]``, each layer a
    :class:`~spqr_format.models.walker.LinearLayer`) in the fixed chunk order.

    ``run_window(i)`` runs this rank's ``i``-th window (``window_ids[i]``) through the code
    whose forward hooks record the layers' inputs. Returns ``{name: accumulator}`` for
    the layers this rank owns (``group.owner(j)``). ``dev`` (a torch device: the GPU encoder)
    accumulates on that device (:class:`~spqr_format.codec.gptq_torch.HessianAccumulatorTorch`,
    float64, one GEMM per window; layers fed one tensor share its product); None: numpy.
    A layer that saw no token (an expert the router never chose) ends with ``tokens == 0``."""
    from spqr_format.models.walker import record_inputs

    pos = {g: i for i, g in enumerate(window_ids)}
    shared = None
    if dev is None:

        def make(name, n):
            return HessianAccumulator(n, name=name)
    else:
        from spqr_format.codec.gptq_torch import HessianAccumulatorTorch, SharedProducts

        shared = SharedProducts()

        def make(name, n):
            return HessianAccumulatorTorch(n, device=dev, name=name)

    sizes = {name: lay.in_features for name, lay in mods}
    totals = {name: make(name, sizes[name])
              for j, (name, _) in enumerate(mods) if group.owner(j) == group.rank}  # fmt: skip
    chunk: dict = {}

    def record(name, x):
        if dev is None:
            chunk[name].add(x.detach().reshape(-1, sizes[name]).float().numpy())
        else:
            chunk[name].add(x if x.dtype == torch.float32 else x.float(), shared)

    handles = record_inputs([lay for _, lay in mods], [name for name, _ in mods], record)
    try:
        n_chunks = group.chunks(n_windows)
        for step in range(-(-n_chunks // group.world)):
            chunk.clear()
            chunk.update({name: make(name, sizes[name]) for name, _ in mods})
            c = step * group.world + group.rank

            def run_chunk(c=c):
                if c < n_chunks:
                    stop = min((c + 1) * WINDOWS_PER_CHUNK, n_windows)
                    for g in range(c * WINDOWS_PER_CHUNK, stop):
                        run_window(pos[g])

            group.run(run_chunk)
            if shared is not None:
                shared.clear()
            for j, (name, _) in enumerate(mods):
                group.fold(torch, totals.get(name), chunk[name], sizes[name], group.owner(j))
    finally:
        for h in handles:
            h.remove()
        chunk.clear()
        if shared is not None:
            shared.clear()
    return totals


# -- launching -----------------------------------------------------------------------------
def torchrun_world() -> int:
    """The WORLD_SIZE torchrun set (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def local_device(device):
    """Under torchrun, ``cuda`` (or ``cuda:K``) means this rank's GPU ``cuda:LOCAL_RANK``
    (one GPU per rank, as ``--nproc-per-node`` = GPUs per host); otherwise ``device``."""
    if str(device).startswith("cuda") and under_torchrun():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def from_env(device: str = "cpu") -> Group:
    """The group of a torchrun launch, initialising the default process group: gloo on the
    CPU, NCCL with cuda (this rank's GPU, :func:`local_device`, made the current device
    first, which NCCL and the object collectives need). ``Group()`` outside torchrun and
    for a CPU launch of one process; a cuda launch of one process (``--nproc-per-node 1``)
    gets a one-rank NCCL group, so that it runs the multi-GPU code (and tests it on one GPU)."""
    cuda = str(device).startswith("cuda")
    if torchrun_world() <= 1 and not (cuda and under_torchrun()):
        return Group()
    from spqr_format.models._deps import require_torch

    torch = require_torch()
    import torch.distributed as dist

    dev = torch.device("cpu")
    if cuda:
        if not torch.cuda.is_available():
            raise SpqrError("--device cuda under torchrun: torch sees no CUDA device")
        dev = torch.device(local_device(device))
        if dev.index >= torch.cuda.device_count():
            raise SpqrError(f"LOCAL_RANK {dev.index}: this host has only "
                            f"{torch.cuda.device_count()} GPUs (one rank per GPU)")  # fmt: skip
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    elif cuda != (dist.get_backend() == "nccl"):
        raise SpqrError(f"the process group uses {dist.get_backend()}; device {device} needs "
                        f"{'nccl' if cuda else 'gloo'}")  # fmt: skip
    return Group(dist, dev)


def quantize_model_distributed(model_dir, output, **kw):
    """:func:`~spqr_format.models.pipeline.quantize_model` on the torchrun group (or one
    process). Every rank returns the result; only rank 0 reports progress. On an error any
    rank raises, every rank raises :class:`RankFailed` and rank 0 removes ``OUT.partial/``."""
    from spqr_format.models.pipeline import PARTIAL_SUFFIX, quantize_model

    kw["device"] = local_device(kw.get("device", "cpu"))
    group = from_env(kw["device"])
    if group.dist is None:
        return quantize_model(model_dir, output, **kw)
    if group.rank != 0:
        kw["progress"] = None
    # torchrun stops the surviving ranks with SIGTERM when one dies: exit through Python.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + signal.SIGTERM))
    try:
        return quantize_model(model_dir, output, group=group, **kw)
    except Exception:
        if group.rank == 0 and getattr(group, "owns_partial", False):
            shutil.rmtree(os.fspath(output) + PARTIAL_SUFFIX, ignore_errors=True)
        raise
    finally:
        try:
            group.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already torn down
            pass


__all__ = ["WINDOWS_PER_CHUNK", "Group", "RankFailed", "collect_hessians", "from_env",
           "local_device", "quantize_model_distributed", "under_torchrun"]  # fmt: skip
