"""Find a model's repeated transformer blocks and the linear layers inside them, generically.

No names per model family: the blocks are the longest ``nn.ModuleList`` whose children are all
of one class (``model.layers`` in Llama/Mistral/Qwen2, ``transformer.h`` in GPT-2,
``model.decoder.layers`` in OPT, ``bert.encoder.layer`` in BERT), and the layers to quantize
are every ``nn.Linear`` in a block, plus GPT-2's ``Conv1D`` (a linear layer whose weight is
stored transposed, ``[in, out]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from spqr_format.errors import BadInputError
from spqr_format.models._deps import require_torch


@dataclass
class LinearLayer:
    """One layer to quantize: ``name`` relative to its block, the module, and whether its
    weight is stored transposed (``Conv1D``: ``[in, out]``; the file holds ``[out, in]``)."""

    name: str
    module: object
    transposed: bool

    @property
    def in_features(self) -> int:
        w = self.module.weight
        return int(w.shape[0] if self.transposed else w.shape[1])

    def weight_out_in(self):
        """The weight as a float32 ``[out, in]`` torch tensor (a copy)."""
        w = self.module.weight.detach()
        return (w.t() if self.transposed else w).float().contiguous().clone()

    def set_weight_out_in(self, w) -> None:
        """Replace the weight by ``w`` (``[out, in]``), in the module's dtype."""
        p = self.module.weight
        src = w.t() if self.transposed else w
        with require_torch().no_grad():
            p.copy_(src.to(dtype=p.dtype, device=p.device))


def is_conv1d(module) -> bool:
    """GPT-2 style ``Conv1D`` (``y = x @ W + b`` with ``W`` of shape ``[nx, nf]``)."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
        and module.weight.ndim == 2
    )


def find_blocks(model) -> tuple[str, list]:
    """``(prefix, blocks)``: the longest ``nn.ModuleList`` of modules of one class (ties go to
    the first in module order) that is not inside another ``nn.ModuleList`` (the experts of a
    block, 64 of them in 16 blocks in OLMoE, are not the blocks). Raises ``BadInputError`` when
    the model has none."""
    torch = require_torch()
    best_name, best = None, None
    lists = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if any(name.startswith(f"{outer}.") for outer in lists if outer):
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) != 1:
            continue
        if not any(find_linears(mod[0])):
            continue
        if best is None or len(mod) > len(best):
            best_name, best = name, mod
    if best is None:
        raise BadInputError(
            f"cannot walk {type(model).__name__}: no list of repeated blocks "
            "(nn.ModuleList of one class holding linear layers) was found"
        )
    return best_name, list(best)


def find_linears(block) -> list[LinearLayer]:
    """Every ``nn.Linear`` (and ``Conv1D``) inside ``block``, in module order."""
    torch = require_torch()
    out = []
    for name, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out.append(LinearLayer(name, mod, transposed=False))
        elif is_conv1d(mod):
            out.append(LinearLayer(name, mod, transposed=True))
    return out
