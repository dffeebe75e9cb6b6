"""Our label conventions: the BraTS 2020 segmentation labels and the six normal labels.

Every source's labels are mapped to these on reading (``ingest/labels.py``); cases are found and
loaded by ``ingest/``.
"""

from __future__ import annotations

import numpy as np

# BraTS segmentation labels (BraTS 2019-2021 convention).
SEG_LABELS = {0: "background", 1: "TC: necrotic / non-enhancing core", 2: "ED: edema",
              4: "ET: enhancing tumour"}
# Model classes of the abnormal target, in order: index = class, value = BraTS label.
ABNORMAL_CLASSES = ("background", "TC", "ED", "ET")
SEG_LABEL_TO_CLASS = np.zeros(5, dtype=np.uint8)
SEG_LABEL_TO_CLASS[[0, 1, 2, 4]] = [0, 1, 2, 3]

# The six normal labels the paper evaluated with.
ANATOMY_LABELS = {0: "none", 1: "left cerebrum", 2: "right cerebrum", 3: "left cerebellum",
                  4: "right cerebellum", 5: "left lateral ventricle",
                  6: "right lateral ventricle"}
