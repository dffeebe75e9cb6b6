"""ingest.labels: the one table from each source's labels to ours (BraTS 2020: 1 TC, 2 ED,
4 ET)."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.labels import LABEL_TABLE, to_internal
from model.data.brats import SEG_LABELS

# What each source calls necrosis / non-enhancing core, edema and enhancing tumour.
SOURCE = {
    "brats2019": (1, 2, 4),
    "brats2020": (1, 2, 4),
    "synthetic": (1, 2, 4),
    "brats2023": (1, 2, 3),
    "msd": (2, 1, 3),
}


@pytest.mark.parametrize("layout", sorted(SOURCE))
def test_each_source_class_lands_on_ours(layout):
    tc, ed, et = SOURCE[layout]
    seg = np.array([[0, tc], [ed, et]], np.uint8)
    assert to_internal(seg, layout).tolist() == [[0, 1], [2, 4]]
    assert set(LABEL_TABLE[layout].values()) == set(SEG_LABELS)


def test_every_layout_has_a_row():
    assert set(LABEL_TABLE) == set(SOURCE)


def test_integer_valued_floats_are_read_and_fractions_refused():
    assert to_internal(np.array([0.0, 3.0]), "brats2023").tolist() == [0, 4]
    with pytest.raises(ValueError, match="non-integer"):
        to_internal(np.array([0.5]), "msd")


def test_unknown_labels_and_layouts_are_named():
    with pytest.raises(ValueError, match=r"values \[-1, 7\] are not msd labels"):
        to_internal(np.array([0, 7, -1], np.int16), "msd")
    with pytest.raises(ValueError, match="no label table for layout 'brats2017'"):
        to_internal(np.zeros(2, np.uint8), "brats2017")
