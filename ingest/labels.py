"""One table from each source's segmentation labels to ours.

Ours are the BraTS 2020 labels (``model/data/brats.py``, ``SEG_LABELS``): 1 TC (necrotic and
non-enhancing tumour core), 2 ED (peritumoural edema), 4 ET (enhancing tumour); 0 background.

| layout      | source labels                                  | ours      |
|-------------|------------------------------------------------|-----------|
| brats2019   | 1 NCR/NET, 2 ED, 4 ET                          | 1, 2, 4   |
| brats2020   | 1 NCR/NET, 2 ED, 4 ET (2020 and 2021)          | 1, 2, 4   |
| synthetic   | as brats2020 (``cbir synth``)                  | 1, 2, 4   |
| brats2023   | 1 NCR, 2 ED, 3 ET (2023-2025, ``-seg``)        | 1, 2, 4   |
| msd         | 1 edema, 2 non-enhancing tumour, 3 enhancing   | 2, 1, 4   |

A label the table does not list for the layout is refused, naming the file: a silent remap of an
unknown convention would train and score against wrong classes.
"""

from __future__ import annotations

import numpy as np

from model.data.brats import SEG_LABELS

# layout -> {source label: our label}; background 0 stays 0 everywhere.
_BRATS_2020 = {0: 0, 1: 1, 2: 2, 4: 4}
LABEL_TABLE: dict[str, dict[int, int]] = {
    "brats2019": _BRATS_2020,
    "brats2020": _BRATS_2020,
    "synthetic": _BRATS_2020,
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 4},
    "msd": {0: 0, 1: 2, 2: 1, 3: 4},
}
assert all(set(t.values()) <= set(SEG_LABELS) for t in LABEL_TABLE.values())

_UNKNOWN = 255


def _lookup(layout: str) -> np.ndarray:
    table = LABEL_TABLE[layout]
    lut = np.full(max(table) + 1, _UNKNOWN, np.uint8)
    lut[list(table)] = list(table.values())
    return lut


def to_internal(seg: np.ndarray, layout: str) -> np.ndarray:
    """``seg`` (integer-valued) in our labels, uint8. Raises ``ValueError`` naming the labels
    the layout's table does not hold."""
    if layout not in LABEL_TABLE:
        raise ValueError(f"no label table for layout {layout!r}; known: "
                         f"{', '.join(LABEL_TABLE)}")
    if np.issubdtype(seg.dtype, np.floating) and not np.all(seg == np.round(seg)):
        raise ValueError("segmentation has non-integer values")
    values = np.unique(seg).astype(np.int64)
    lut = _lookup(layout)
    bad = [int(v) for v in values if v < 0 or v >= len(lut) or lut[v] == _UNKNOWN]
    if bad:
        raise ValueError(f"segmentation values {bad} are not {layout} labels "
                         f"(expected {sorted(LABEL_TABLE[layout])})")
    return lut[seg if np.issubdtype(seg.dtype, np.integer) else seg.astype(np.int64)]
