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
    report = mask_cost.main(["--shapes", "4x8x3", "2x4x4x3", "--repeats", "2", "--dtype", "bfloat16"])
    assert report.startswith("bfloat16:")
    rows, heap = report.splitlines()[1:-1], report.splitlines()[-1]
    assert heap.startswith("heap: ")
    assert [r.split()[0] for r in rows] == ["4x8x3", "2x4x4x3"]
    assert all(float(r.split()[1]) > 0 for r in rows)
    assert all(float(r.split()[3]) >= 0 and r.split()[4].startswith("(") for r in rows)


def test_the_temporaries_are_the_compiled_steps():
    # Both steps hold the loss's own x-sized arrays; the mask adds less than a quarter of x's
    # bytes (it keeps its length-1 channel axis). A column that read one program twice would
    # show no difference at all.
    plain, masked = mask_cost.steps((8, 256, 32), "bfloat16")
    assert plain.temporaries > 0.0
    assert 0.0 < masked.temporaries - plain.temporaries < 0.25
