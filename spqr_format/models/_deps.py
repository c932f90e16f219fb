"""Lazy imports of the optional ``models`` extra (torch, transformers)."""

from __future__ import annotations

from spqr_format.errors import BadInputError

INSTALL_HINT = "pip install 'spqr-format[models]'"


def require_torch():
    try:
        import torch
    except ImportError:
        raise BadInputError(
            f"whole-model commands need PyTorch and transformers ({INSTALL_HINT})"
        ) from None
    return torch


def require_transformers():
    require_torch()
    try:
        import transformers
    except ImportError:
        raise BadInputError(f"whole-model commands need transformers ({INSTALL_HINT})") from None
    return transformers
