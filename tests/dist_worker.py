"""Run by the distributed tests under torchrun (one process per rank).

``quantize ARGS...``: ``spqr quantize-model ARGS`` as a rank; with ``SPQR_TEST_FAIL_RANK=r``
rank r raises in the second block's encoding (the failure test); with
``SPQR_TEST_TORCH_ENCODER=1`` ``--device cpu`` runs the code of ``--device cuda`` on the CPU
(the torch encoder, torch Hessian accumulators, chunk sums gathered in row pieces of
``SPQR_TEST_FOLD_BYTES``), which gloo can carry.
``tp FILE OUT.npy [DEVICE [SHARDS[,SHARDS]]]``: load FILE tensor-parallel, run a fixed input,
rank 0 saves the logits (with several SHARDS kinds, to OUT-<kind>.npy each).
"""

import os
import sys

import numpy as np


def main() -> None:
    import torch

    torch.set_num_threads(1)
    what, args = sys.argv[1], sys.argv[2:]
    if what == "quantize":
        if os.environ.get("SPQR_TEST_TORCH_ENCODER") == "1":
            from spqr_format.models import distributed, pipeline

            pipeline._encoder_device = lambda device: torch.device("cpu")
            distributed.FOLD_BYTES = int(os.environ.get("SPQR_TEST_FOLD_BYTES", "0")) or (
                distributed.FOLD_BYTES
            )
        fail = os.environ.get("SPQR_TEST_FAIL_RANK")
        if fail is not None and os.environ.get("RANK") == fail:
            from spqr_format.models import pipeline

            real = pipeline._encode_layer

            def failing(torch_, lay, name, *a, **k):
                if ".1." in name:
                    raise RuntimeError(f"injected failure on {name}")
                return real(torch_, lay, name, *a, **k)

            pipeline._encode_layer = failing
        from spqr_format.cli import main as cli

        cli(["quantize-model", *args])
    elif what == "tp":
        from spqr_format.models.tp import load_model_tp

        device = args[2] if len(args) > 2 else "cpu"
        # SHARDS: dense, packed, or several separated by commas (one launch, OUT-<shards>.npy)
        modes = args[3].split(",") if len(args) > 3 else [None]
        for shards in modes:
            kw = {"shards": shards} if shards else {}
            model = load_model_tp(args[0], device=device, **kw)
            ids = torch.from_numpy(np.arange(3 * 24).reshape(3, 24) % 40 + 5)
            with torch.no_grad():
                logits = model(
                    input_ids=ids.to(device if device == "cpu" else model.device), use_cache=False
                ).logits
            if model.tp_rank == 0:
                out = args[1] if len(modes) == 1 else args[1].replace(".npy", f"-{shards}.npy")
                np.save(out, logits.float().cpu().numpy())
                print("tp_read", shards, model.tp_read)


if __name__ == "__main__":
    main()
