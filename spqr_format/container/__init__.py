"""The .spqr container (SPEC section 2): sections, offsets, alignment, CRCs, names, metadata.

This layer knows nothing of quantization; ``params`` and section contents are opaque here and
belong to :mod:`spqr_format.codec`.
"""

from spqr_format.container.layout import SectionInfo, TensorEntry
from spqr_format.container.reader import ContainerReader
from spqr_format.container.writer import ContainerWriter

__all__ = ["ContainerReader", "ContainerWriter", "SectionInfo", "TensorEntry"]
