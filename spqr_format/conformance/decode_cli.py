"""Our decoders behind the conformance protocol (conformance/README.md, "Decoder protocol").

    python -m spqr_format.conformance.decode_cli INPUT OUTPUT
    python -m spqr_format.conformance.decode_cli --matvec X INPUT OUTPUT
    python -m spqr_format.conformance.decode_cli --backend gpu INPUT OUTPUT

Decodes every tensor of INPUT to its own dtype (checking CRCs, data validity and digests) and
writes OUTPUT as safetensors; with ``--matvec X`` (a safetensors file of F32 ``x`` per tensor)
writes ``y = W x`` per tensor as F32 instead. Exit 0 on success; on a refused file prints
``E_CODE: message`` on stderr and exits 1; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from spqr_format.conformance import stfile
from spqr_format.conformance.backends import BackendUnavailable, load_backend


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spqr_format.conformance.decode_cli")
    ap.add_argument("--backend", default="cpu", help="cpu, gpu or module:attribute")
    ap.add_argument("--matvec", metavar="X", help="safetensors file of x per tensor")
    ap.add_argument("input")
    ap.add_argument("output")
    args = ap.parse_args(argv)
    try:
        dec = load_backend(args.backend)
    except BackendUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.matvec:
            xs = {n: stfile.as_array(e) for n, e in stfile.read(args.matvec).items()}
            ys = dec.matvec(args.input, xs)
            tensors = {n: ("F32", np.asarray(y, np.float32)) for n, y in ys.items()}
            stfile.write(args.output, tensors)
        else:
            out = dec.decode(args.input)
            tmp = args.output + ".tmp"
            with open(tmp, "wb") as f:
                f.write(stfile.dumps({n: (t.dtype, _Raw(t)) for n, t in out.items()}))
            os.replace(tmp, args.output)
    except Exception as exc:
        code = getattr(exc, "code", None)
        if isinstance(code, str) and code.startswith("E_"):
            msg = str(exc)
            print(msg if msg.startswith(code) else f"{code}: {msg}", file=sys.stderr)
            return 1
        raise
    return 0


class _Raw:
    """A decoded tensor as stfile.dumps takes it (declared shape, raw bytes)."""

    def __init__(self, t):
        self.shape = t.shape
        storage = stfile.DTYPES[t.dtype][0]
        self._a = np.frombuffer(t.data, dtype=storage)
        self.dtype = self._a.dtype

    def __array__(self, dtype=None, copy=None):
        return self._a


if __name__ == "__main__":
    sys.exit(main())
