"""The catalogue view a generation serves from, read in chunks of rows into arrays of the final
size: equal to the catalogue's rows read one by one through the ORM."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from indexer import catalog, store
from indexer.catalog import NO_AREA, Slice, decode_codes, decode_codes_columns, open_catalog
from service.catalogue_view import read_view


def test_the_view_read_in_chunks_equals_the_rows(service_index, monkeypatch):
    engine = open_catalog(store.default_db_url(service_index), migrate=False)
    try:
        with Session(engine) as session:
            rows = session.scalars(select(Slice).order_by(Slice.id)).all()
        # Many chunks, the last one short: a chunk size that does not divide the row count.
        chunk = next(c for c in range(7, 100) if len(rows) % c)
        views = [read_view(engine)]
        monkeypatch.setattr(catalog, "READ_CHUNK", chunk)
        views.append(read_view(engine))
    finally:
        engine.dispose()
    assert len(rows) > 3 * chunk, len(rows)
    area = lambda a: NO_AREA if a is None else a  # noqa: E731
    for view in views:
        np.testing.assert_array_equal(view.slice_ids, [r.id for r in rows])
        np.testing.assert_array_equal(view.slice_patient, [r.patient_id for r in rows])
        np.testing.assert_array_equal(view.slice_index, [r.slice_index for r in rows])
        np.testing.assert_array_equal(view.slice_abnormal, [
            -1 if r.has_abnormality is None else int(r.has_abnormality) for r in rows])
        np.testing.assert_array_equal(view.areas, [
            [area(r.area_tc), area(r.area_ed), area(r.area_et), r.brain_area] for r in rows])
        np.testing.assert_array_equal(view.codes, np.stack([
            [decode_codes(r.normal_codes), decode_codes(r.abnormal_codes)] for r in rows]))
        assert view.codes.dtype == np.uint16 and view.codes.flags.writeable


def test_a_stored_code_of_another_size_is_named():
    good = np.arange(64, dtype="<u2").tobytes()
    np.testing.assert_array_equal(decode_codes_columns([good], [good])[0, 1],
                                  np.arange(64).reshape(8, 8))
    with pytest.raises(ValueError, match=r"a stored code is not \(8, 8\) uint16 \(128 bytes\)"):
        decode_codes_columns([good], [good[:-2]])
