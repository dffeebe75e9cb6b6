"""``cbir eval``: how well the retrieval works, measured against labels and baselines.

``cohorts`` reads the references (the index) and draws the query slices, ``protocol`` runs the
model and the searches, ``metrics`` and ``figures`` turn neighbours into figures, ``report``
writes ``eval.json`` and the HTML page. Nothing here knows HTTP; it drives the same
``service.retrieval.Retrieval`` the API serves.
"""
