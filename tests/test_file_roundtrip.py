"""Write, read back and decode through the public API: the file path end to end equals the
independent SPEC model (tests/spec_model.py) bit for bit, and the stored digest matches."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import spec_model
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import bilevel_tensors, random_bilevel

import spqr_format
from spqr_format.codec.bilevel import BilevelParams, PackedBilevel
from spqr_format.codec.packing import pack
from spqr_format.spec import DType

PROPERTY = settings(derandomize=True, deadline=None, max_examples=120)


def _round_trip(tensors: dict, check) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.spqr")
        spqr_format.save(path, tensors, metadata={"user.note": "round trip"})
        with spqr_format.open(path) as f:
            assert f.names() == list(tensors)
            assert f.metadata == {"user.note": "round trip"}
            for name in tensors:
                f.verify(name)  # CRCs, data checks and the SHA-256 digest
                check(f, name)


@PROPERTY
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@given(
    bilevel_tensors(max_m=6, max_n=200, dtype=DType.FLOAT32),
    st.sampled_from([DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16]),
)
def test_written_file_decodes_to_the_spec_model_bit_for_bit(t, out_dtype):
    t.dtype = out_dtype
    want_f32 = spec_model.decode_f32(pack(t))

    def check(f, name):
        read = f.read(name)
        assert isinstance(read, PackedBilevel)
        assert read.params == t.params and read.shape == t.shape
        got = f.decode(name, "float32")
        np.testing.assert_array_equal(got.view(np.uint32), want_f32.view(np.uint32))
        own = f.decode(name)  # the tensor's own dtype, which the digest covers
        if out_dtype == DType.FLOAT16:  # values past 65504 overflow to inf, as C-7.5 says
            np.testing.assert_array_equal(
                own.view(np.uint16), want_f32.astype(np.float16).view(np.uint16)
            )
        elif out_dtype == DType.BFLOAT16:
            np.testing.assert_array_equal(own, spec_model.round_bf16_by_distance(want_f32))

    _round_trip({"w": t}, check)


@PROPERTY
@given(
    st.lists(st.integers(0, 5), min_size=0, max_size=3),
    st.sampled_from([np.float32, np.float16]),
)
def test_raw_tensors_round_trip_exactly(shape, np_dtype):
    rng = np.random.default_rng(len(shape))
    data = rng.standard_normal(shape).astype(np_dtype) if shape else np.array(1.5, np_dtype)

    def check(f, name):
        got = f.decode(name)
        assert got.dtype == np_dtype and got.shape == data.shape
        np.testing.assert_array_equal(
            got.reshape(-1).view(np.uint8), data.reshape(-1).view(np.uint8)
        )

    _round_trip({"raw": data}, check)


def test_wide_tensor_with_more_than_65536_columns_round_trips():
    rng = np.random.default_rng(5)
    t = random_bilevel(rng, 3, 70_000, BilevelParams(3, 16, 3, 16), True, 0.01)
    want = spec_model.decode_f32(pack(t))

    def check(f, name):
        np.testing.assert_array_equal(
            f.decode(name, "float32").view(np.uint32), want.view(np.uint32)
        )

    _round_trip({"wide": t}, check)
