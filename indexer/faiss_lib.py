"""faiss, imported after SimpleITK: the one place the project takes faiss from.

Both are SWIG modules and share SWIG's table of wrapped C++ types; whichever loads last owns the
Python proxies of the ``std::vector`` types both wrap. With faiss first and SimpleITK
(``ingest``) second, faiss hands back SimpleITK's ``VectorUInt8``, ``VectorInt64`` and
``VectorFloat``, and ``faiss.serialize_index``, ``vector_to_array`` and
``copy_array_to_vector`` fail (an ``AssertionError`` in ``faiss.array_conversions``; seen with
faiss-cpu 1.15.1 and SimpleITK 2.5.7, writing an index after preprocessing a volume). SimpleITK
first and faiss second works for both, so every module imports faiss from here.
"""

from __future__ import annotations

import sys

if "faiss" in sys.modules and "SimpleITK" not in sys.modules:
    raise ImportError("faiss was imported before SimpleITK: import it through "
                      "indexer.faiss_lib (see its docstring), or import SimpleITK first")

import SimpleITK  # noqa: E402, F401, I001  (first: see above)
import faiss  # noqa: E402

__all__ = ["faiss"]
