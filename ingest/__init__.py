"""Bringing scans in: finding the cases of every supported layout and loading one case as a
volume in the model's space, with its labels mapped to ours; DICOM series (``dicom.py``) and
PACS pulls over DICOMweb (``pacs.py``), brought to the model's grid by ``cases.to_model_space``.

Sits beside ``model/data/``: it reads with ``model/data/nifti.py`` and normalises with
``model/data/preprocess.py`` (the one preprocessing path); training, the indexer, evaluation and
the CLI ask it for cases. Nothing here knows of FAISS or HTTP, and nothing in ``model/data``'s
reader, preprocessing or label conventions imports it.
"""
