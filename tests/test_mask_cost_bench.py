"""benchmarks.mask_cost: its mask and its table (timings are not asserted)."""

import numpy as np

from benchmarks import mask_cost


def test_the_mask_keeps_a_prefix_of_at_least_half_of_each_sample():
    keep = np.asarray(mask_cost.padding_mask((16, 10, 3)))
    assert keep.shape == (16, 10, 1)
    lengths = keep[:, :, 0].sum(axis=1)
    assert (lengths >= 5).all() and (lengths <= 10).all() and len(set(lengths)) > 1
    assert all(keep[n, : lengths[n], 0].all() for n in range(16))  # a prefix, then padding


def test_the_table_has_a_row_per_shape():
    report = mask_cost.main(["--shapes", "4x8x3", "2x4x4x3", "--repeats", "2"])
    rows = report.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["4x8x3", "2x4x4x3"]
    assert all(float(r.split()[1]) > 0 for r in rows)
