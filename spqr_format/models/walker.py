"""Find a model's repeated transformer blocks and the linear layers inside them, generically.

No names per model family: the blocks are the longest ``nn.ModuleList`` whose children are all
of one class (``model.layers`` in Llama/Mistral/Qwen2, ``transformer.h`` in GPT-2,
``model.decoder.layers`` in OPT, ``bert.encoder.layer`` in BERT), and the layers to quantize
are every ``nn.Linear`` in a block, plus GPT-2's ``Conv1D`` (a linear layer whose weight is
stored transposed, ``[in, out]``), plus every expert of a mixture-of-experts block.

Mixture of experts, two layouts:

- **stacked experts** (transformers >= 5: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, GPT-OSS...):
  one module holds every expert's weights as 3-D parameters ``gate_up_proj`` (or ``up_proj``)
  ``[E, out, in]`` and ``down_proj``, and says how it computes through the attributes of
  transformers' ``use_experts_implementation`` (``has_gate``, ``has_bias``,
  ``is_transposed``: ``[E, in, out]``, ``_apply_gate``, ``act_fn``). Each expert's slice is one
  layer, named ``<param>[e]`` (``mlp.experts.gate_up_proj[3]``); its inputs are computed from
  the experts module's own inputs (the hidden states and the router's top-k choice) by
  :func:`record_inputs`. A stacked parameter without those attributes (e.g. Llama 4) is not
  recognised and stays raw.
- **a list of expert modules** (transformers 4: ``block_sparse_moe.experts.3.w1``): the
  ``nn.Linear`` layers inside an ``nn.ModuleList`` of the block.

Either way the expert layers are ``routed``: the router may send no calibration token to some
of them, which the pipeline handles (an identity Hessian, reported). Routing layers are not
quantized: an ``nn.Linear`` next to the experts (a child of the module holding them) with at
most one output per expert, i.e. the router (``block_sparse_moe.gate`` in transformers 4) or a
shared expert's gate (Qwen2-MoE's ``shared_expert_gate``): tiny, and they decide which experts
run and how much. In transformers 5 routers are plain parameters, never walked.
"""

from __future__ import annotations

from dataclasses import dataclass

from spqr_format.errors import BadInputError
from spqr_format.models._deps import require_torch


@dataclass
class LinearLayer:
    """One layer to quantize: ``name`` relative to its block, the module, and whether its
    weight is stored transposed (``Conv1D``: ``[in, out]``; the file holds ``[out, in]``).

    ``param`` is the module's parameter holding the weight; ``expert`` (stacked experts) the
    index of this layer's slice of that 3-D parameter. ``routed``: an expert of a mixture of
    experts (may see no calibration token)."""

    name: str
    module: object
    transposed: bool
    param: str = "weight"
    expert: int | None = None
    routed: bool = False

    @property
    def key(self) -> str:
        """The tensor's name in the file, relative to the block: ``<name>.weight``, or
        ``<module>.<param>[e]`` for a slice of stacked experts."""
        return self.name if self.expert is not None else f"{self.name}.{self.param}"

    @property
    def state_key(self) -> str:
        """The ``state_dict`` entry (relative to the block) that holds the weight."""
        if self.expert is None:
            return f"{self.name}.{self.param}"
        return self.name[: self.name.rindex("[")]

    @property
    def weight(self):
        """The weight as stored in the module (a view of one expert's slice for stacked
        experts)."""
        p = getattr(self.module, self.param)
        return p if self.expert is None else p[self.expert]

    @property
    def in_features(self) -> int:
        w = self.weight
        return int(w.shape[0] if self.transposed else w.shape[1])

    @property
    def shape_out_in(self) -> tuple[int, int]:
        s = tuple(int(d) for d in self.weight.shape)
        return (s[1], s[0]) if self.transposed else (s[0], s[1])

    def weight_out_in(self):
        """The weight as a float32 ``[out, in]`` torch tensor (a copy)."""
        w = self.weight.detach()
        return (w.t() if self.transposed else w).float().contiguous().clone()

    def set_weight_out_in(self, w) -> None:
        """Replace the weight by ``w`` (``[out, in]``), in the module's dtype."""
        torch = require_torch()
        with torch.no_grad():
            p = self.weight
            src = w.t() if self.transposed else w
            p.copy_(src.to(dtype=p.dtype, device=p.device))


def is_conv1d(module) -> bool:
    """GPT-2 style ``Conv1D`` (``y = x @ W + b`` with ``W`` of shape ``[nx, nf]``)."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
        and module.weight.ndim == 2
    )


def stacked_expert_params(module) -> list[str]:
    """The 3-D weight parameters of a stacked-experts module (transformers'
    ``use_experts_implementation`` attributes, see the module docstring), first projection
    first; ``[]`` for any other module."""
    torch = require_torch()
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed")):
        return []
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    params = [getattr(module, n, None) for n in names]
    if not all(isinstance(p, torch.nn.Parameter) and p.ndim == 3 for p in params):
        return []
    if params[0].shape[0] != params[1].shape[0]:
        return []
    return names


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
    """Every ``nn.Linear`` (and ``Conv1D``) inside ``block``, and every expert slice of its
    stacked-experts modules, in module order; routers of mixtures of experts excluded."""
    torch = require_torch()
    mods = dict(block.named_modules())
    stacked = {n: stacked_expert_params(m) for n, m in mods.items()}
    # expert containers: stacked experts, or an nn.ModuleList of one class holding linears
    experts = {}  # name -> number of experts
    for n, m in mods.items():
        if stacked[n]:
            experts[n] = getattr(m, stacked[n][0]).shape[0]
        elif (isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1
              and any(isinstance(x, torch.nn.Linear) for x in m[0].modules())):  # fmt: skip
            experts[n] = len(m)
    # a linear next to the experts with at most one output per expert: the router, or the
    # gate of a shared expert
    beside = {n.rpartition(".")[0]: e for n, e in experts.items() if n}
    out = []
    for name, mod in mods.items():
        if stacked[name]:
            transposed = bool(mod.is_transposed)
            for param in stacked[name]:
                for e in range(getattr(mod, param).shape[0]):
                    out.append(LinearLayer(f"{name}.{param}[{e}]", mod, transposed, param=param,
                                           expert=e, routed=True))  # fmt: skip
            continue
        linear = isinstance(mod, torch.nn.Linear)
        if not (linear or is_conv1d(mod)):
            continue
        parent = name.rpartition(".")[0]
        if linear and parent in beside and mod.out_features <= beside[parent]:
            continue  # a router: stays raw
        routed = any(name.startswith(f"{n}.") for n in experts)
        out.append(LinearLayer(name, mod, transposed=not linear, routed=routed))
    return out


def record_inputs(layers, names, record) -> list:
    """Forward hooks that call ``record(name, x)`` with the input ``x`` (``[..., in]``) of
    each of ``layers`` (named ``names``) whenever the model runs; returns the handles (remove
    them when done). A layer that computes nothing in a forward (an expert no token was
    routed to) gets no call.

    Stacked experts: one pre-hook on the experts module takes its input hidden states and
    the router's top-k expert indices; expert ``e``'s first projection sees the rows routed
    to ``e``, its ``down_proj`` what the module computes from them (first projection with the
    current weights, plus bias, then ``_apply_gate``, or ``act_fn`` without a gate)."""
    torch = require_torch()
    handles = []
    by_experts: dict[int, list] = {}
    for lay, name in zip(layers, names, strict=True):
        if lay.expert is not None:
            by_experts.setdefault(id(lay.module), []).append((lay, name))
            continue

        def hook(module, args, out, name=name):
            record(name, args[0])

        handles.append(lay.module.register_forward_hook(hook))
    for group in by_experts.values():
        mod = group[0][0].module
        wanted = {(lay.param, lay.expert): name for lay, name in group}

        def pre_hook(module, args, kwargs, wanted=wanted):
            _record_experts(torch, module, args, kwargs, wanted, record)

        handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
    return handles


def _record_experts(torch, mod, args, kwargs, wanted: dict, record) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    rest = [*args[1:], *(v for k, v in kwargs.items() if k != "hidden_states")]
    index = next((t for t in rest if isinstance(t, torch.Tensor)
                  and not t.is_floating_point()), None)  # fmt: skip
    if index is None:
        raise BadInputError(f"{type(mod).__name__}: no expert indices among the experts "
                            "module's inputs")  # fmt: skip
    x = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(x.shape[0], -1)
    first, second = stacked_expert_params(mod)
    for e in range(getattr(mod, first).shape[0]):
        rows = (index == e).any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xe = x[rows]
        if (first, e) in wanted:
            record(wanted[(first, e)], xe)
        if (second, e) in wanted:
            w = getattr(mod, first)[e]
            h = xe @ w if mod.is_transposed else torch.nn.functional.linear(xe, w)
            if mod.has_bias:
                h = h + getattr(mod, f"{first}_bias")[e]
            h = mod._apply_gate(h) if mod.has_gate else mod.act_fn(h)
            record(wanted[(second, e)], h)
