"""The tissue classes a synthetic patient is drawn as, and what post-contrast T1 makes of each.

A synthetic patient is a label map first (``<ID>_tissue.nii.gz``); its image is one rendering of
that map (``model/data/synth/appearance.py``), and training renders the same map again with other
draws (SynthSeg's idea, Billot et al. 2023: learn from label maps, not from one image).

| id | class | seg label | T1-Gd intensity prior (white matter = 1) |
|---|---|---|---|
| 0 | background (outside the brain) | | 0 |
| 1 | white matter | | 1 |
| 2 | cortical grey matter | | 0.70-0.95 |
| 3 | deep grey matter (basal ganglia, thalamus) | | between grey and white |
| 4 | CSF (sulci, cisterns, third and fourth ventricle) | | 0.10-0.45 |
| 5 | lateral ventricles | | CSF x 0.85-1.1 |
| 6 | vessels (cortical arteries and veins) | | 1.05-2.2 |
| 7 | dura left by skull stripping | | 0.8-1.8 |
| 8 | venous sinuses (sagittal, straight, transverse) | | 1.1-2.4 |
| 9 | choroid plexus | | 0.9-2.0 |
| 10 | necrosis | 1 (TC) | 0.10-0.55 |
| 11 | non-enhancing tumour | 1 (TC) | 0.50-0.95 |
| 12 | edema | 2 (ED) | 0.60-0.97 |
| 13 | enhancing tumour | 4 (ET) | 1.05-2.0 |

Classes 6-9 are normal tissue that enhances, and real post-contrast T1 has all of them: a model
that never saw them calls the posterior sagittal sinus a tumour. The priors are ranges of what
T1-weighted post-contrast images show in general (white above grey above CSF; enhancing structures
above white matter; necrosis dark), not values read off any scan here.
"""

from __future__ import annotations

import numpy as np

BACKGROUND, WM, GM, DEEP_GM, CSF, VENTRICLE = 0, 1, 2, 3, 4, 5
VESSEL, DURA, SINUS, CHOROID = 6, 7, 8, 9
NECROSIS, NON_ENHANCING, EDEMA, ENHANCING = 10, 11, 12, 13
NUM_TISSUES = 14

TISSUE_NAMES = ("background", "white matter", "cortical grey matter", "deep grey matter", "CSF",
                "lateral ventricles", "vessels", "dura", "venous sinuses", "choroid plexus",
                "necrosis", "non-enhancing tumour", "edema", "enhancing tumour")
NORMAL_ENHANCING = (VESSEL, DURA, SINUS, CHOROID)
LESION_TISSUES = (NECROSIS, NON_ENHANCING, EDEMA, ENHANCING)

# Tissue id -> BraTS segmentation label (0, 1 TC, 2 ED, 4 ET).
TISSUE_TO_SEG = np.zeros(NUM_TISSUES, np.uint8)
TISSUE_TO_SEG[[NECROSIS, NON_ENHANCING, EDEMA, ENHANCING]] = [1, 1, 2, 4]

# Uniform ranges of each class's mean intensity, white matter = 1 (the table above). Deep grey
# matter and the ventricles are drawn relative to others (``appearance.sample_means``).
INTENSITY_PRIOR = {
    GM: (0.70, 0.95),
    CSF: (0.10, 0.45),
    VESSEL: (1.05, 2.2),
    DURA: (0.8, 1.8),
    SINUS: (1.1, 2.4),
    CHOROID: (0.9, 2.0),
    NECROSIS: (0.10, 0.55),
    NON_ENHANCING: (0.50, 0.95),
    EDEMA: (0.60, 0.97),
    ENHANCING: (1.05, 2.0),
}


def seg_of(tissue: np.ndarray) -> np.ndarray:
    """The BraTS segmentation (labels 0, 1, 2, 4) a tissue map implies."""
    return TISSUE_TO_SEG[tissue]
