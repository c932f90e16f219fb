"""The benchmark's fast random tensors (spqr_format.gpu.synth, numpy only) are valid files."""

from __future__ import annotations

import numpy as np
import spec_model

from spqr_format.codec.reference import decode_bilevel_f32, validate_packed
from spqr_format.gpu.synth import random_packed


def test_random_packed_tensors_are_valid_and_decode_like_the_spec_model():
    for m, n, kw in [
        (33, 1000, {}),
        (5, 70_000, {"bits": 4, "group_size": 128, "stats_bits": 0}),
        (17, 300, {"perm": False, "outlier_fraction": 0.0}),
    ]:
        p = random_packed(m, n, seed=1, **kw)
        validate_packed(p)
        np.testing.assert_array_equal(
            decode_bilevel_f32(p).view(np.uint32), spec_model.decode_f32(p).view(np.uint32)
        )
