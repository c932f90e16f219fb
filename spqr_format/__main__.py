"""``python -m spqr_format ...`` is the ``spqr`` command (so ``torchrun -m spqr_format
quantize-model ...`` runs one rank of a distributed quantization)."""

from spqr_format.cli import main

if __name__ == "__main__":
    main()
