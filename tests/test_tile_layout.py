"""The GPU tile layout (spqr_format.gpu.tile_layout) on the CPU: the repack moves every code
and statistic where the tensor-core kernel's lanes read them, and the kernel's f16 fragment
arithmetic (emulated in numpy) stays within its stated bound of the exact SPEC decode."""

from __future__ import annotations

import numpy as np
import pytest
import spec_model
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import random_bilevel

from spqr_format.codec.bilevel import BilevelParams
from spqr_format.codec.packing import pack
from spqr_format.codec.row_layout import pack_padded_rows, row_words, to_row_layout
from spqr_format.gpu import tile_layout as TL


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    bits=st.integers(1, 8),
    count=st.integers(1, 300),
    rows=st.integers(1, 4),
    seed=st.integers(0, 99),
)
def test_unpack_fields_reads_padded_rows(bits, count, rows, seed):
    rng = np.random.default_rng(seed)
    vals = rng.integers(0, 1 << bits, size=(rows, count), dtype=np.uint8)
    words = pack_padded_rows(vals, bits)
    assert words.shape == (rows, row_words(count, bits)) and words.shape[1] % (4 * bits) == 0
    assert np.array_equal(TL.unpack_fields(np, words, bits, count), vals)


def test_pair_slots():
    assert [TL.pair_slots(b) for b in (1, 2, 3, 4)] == [16, 8, 5, 4]


def _dense_oracle(p):
    """Dense values (outliers not applied), stored order, from the independent spec model
    (``p`` in the file form)."""
    m, n = p.shape
    s, z = spec_model.statistics(p)
    q = spec_model.unpack_elements(p.codes, p.params.bits, m * n).reshape(m, n)
    q = q.astype(np.float32)
    k = np.arange(n) // p.params.group_size
    return np.multiply(s[:, k], np.subtract(q, z[:, k], dtype=np.float32), dtype=np.float32), s, z


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    m=st.sampled_from([1, 5, 16, 17, 40]),
    n=st.sampled_from([1, 16, 33, 80, 81, 200]),
    bits=st.sampled_from([2, 3, 4]),
    sb=st.sampled_from([1, 2, 3, 4]),
    S=st.sampled_from([16, 32]),
    seed=st.integers(0, 999),
)
def test_emulated_fragments_within_bound_of_exact_decode(m, n, bits, sb, S, seed):
    rng = np.random.default_rng(seed)
    t = random_bilevel(rng, m, n, BilevelParams(bits, 16, sb, S), True, 0.05)
    f = pack(t)
    p = to_row_layout(f)
    assert TL.ineligible_reason(p) is None and TL.stats_range_ok(p)
    codes = TL.repack_codes(np, p.codes, m, n, bits, rows_per_step=16)
    stats, stats2 = TL.repack_stats(np, p.stats, p.stats2, m, n, bits, sb, S)
    geo = TL.geometry(m, n, bits, sb)
    assert codes.shape == (geo["NC"], geo["RB"], geo["SLABS"], 32, 4)
    assert stats.shape == (geo["NC"], geo["RB"], 32, geo["SWL"])
    emu = TL.emulate_dense(codes, stats, stats2, m, n, bits, sb).astype(np.float64)
    exact, s, z = _dense_oracle(f)
    exact = exact.astype(np.float64)
    r, c = np.repeat(np.arange(m), n), np.tile(np.arange(n), m)
    assert np.array_equal(TL.dense_at(p, r, c).reshape(m, n), exact.astype(np.float32))
    k = np.arange(n) // 16
    scale = np.abs(s[:, k]).astype(np.float64) * (t.codes + np.abs(z[:, k]).astype(np.float64))
    bound = 5 * 2.0**-11 * scale + 2.0**-20
    assert np.all(np.abs(emu - exact) <= bound)


def test_repack_is_a_bijection_of_the_codes():
    # distinct codes everywhere: every (row, column) lands in exactly one (lane, word, slot)
    m, n, bits = 32, 160, 4
    rng = np.random.default_rng(0)
    t = random_bilevel(rng, m, n, BilevelParams(bits, 16, 3, 16), False, 0.0)
    p = to_row_layout(pack(t))
    tl = TL.repack_codes(np, p.codes, m, n, bits)
    counts = np.zeros(1 << bits, dtype=np.int64)
    for i in range(TL.pair_slots(bits)):
        for half in (0, 1):
            v = (tl >> np.uint32(i * bits + 16 * half)) & np.uint32((1 << bits) - 1)
            counts += np.bincount(v.reshape(-1), minlength=1 << bits)
    expect = np.bincount(t.codes.reshape(-1), minlength=1 << bits)
    geo = TL.geometry(m, n, bits, 3)
    expect[0] += 16 * geo["RB"] * 16 * geo["KT"] - m * n  # padding holds code 0
    assert np.array_equal(counts, expect)


def test_outlier_corrections_restore_the_outlier_values():
    rng = np.random.default_rng(5)
    m, n = 20, 70000  # columns past 65,536: skip entries in the stream
    t = random_bilevel(rng, m, n, BilevelParams(3, 16, 3, 16), True, 0.001)
    p = to_row_layout(pack(t))
    ent, dmax = TL.outlier_corrections(p)
    assert ent.shape == np.asarray(p.outlier_entries).shape
    skips = (ent >> 16) == 0xFFFF
    assert np.array_equal(skips, (np.asarray(p.outlier_entries) >> 16) == 0xFFFF)
    assert np.array_equal(ent & 0xFFFF, np.asarray(p.outlier_entries) & 0xFFFF)
    o = t.outliers
    d = (ent[~skips] >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
    w = TL.dense_at(p, o.rows, o.cols).astype(np.float64)
    vals = o.values.astype(np.float64)
    assert np.all(np.abs(w + d - vals) <= 2.0**-11 * np.abs(vals - w) + 1e-30)
    assert dmax == pytest.approx(np.max(np.abs(vals - w)), rel=1e-6)


@pytest.mark.parametrize(
    "bits,g,sb,S,m,why",
    [
        (8, 16, 3, 16, 64, "bits=8"),
        (3, 128, 3, 16, 64, "group_size=128"),
        (3, 16, 0, 0, 64, "stats_bits=0"),
        (3, 16, 3, 3, 64, "stats_group_size=3"),
        (3, 16, 6, 16, 64, "stats_bits=6"),
    ],
)
def test_ineligible_configurations_say_why(bits, g, sb, S, m, why):
    rng = np.random.default_rng(1)
    t = random_bilevel(rng, m, 64, BilevelParams(bits, g, sb, S), False, 0.0)
    assert why in TL.ineligible_reason(to_row_layout(pack(t)))


def test_small_tile_count_fits_m_below_tile():
    rng = np.random.default_rng(2)
    t = random_bilevel(rng, 5, 64, BilevelParams(3, 16, 3, 8), False, 0.0)
    assert TL.ineligible_reason(to_row_layout(pack(t))) is None  # S >= m: one stats tile
