"""How arrays travel in Flower records, read without copies (the stage records' schema: common.secagg.stages)."""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array
from numpy.lib import format as npy_format


def array_view(data: bytes, dtype: np.dtype | type, length: int) -> np.ndarray:
    """A read-only view of a Flower Array's .npy bytes as a flat `dtype` vector of `length` values.

    Flower's Array.numpy() copies into a fresh array; for model-sized vectors from every site that copy (and its
    page faults) dominates the server's aggregation. This parses the .npy header, checks dtype, order and size, and
    views the payload in place. It refuses anything else, so a hostile reply cannot smuggle in another type.
    """
    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, found = read_header(stream)
    except ValueError as err:
        raise ValueError(f"not a .npy array: {err}") from err
    expected = np.dtype(dtype)
    if found != expected or fortran or int(np.prod(shape)) != length:
        raise ValueError(f"expected {length} values of {expected}, got shape {shape} of {found}")
    offset = stream.tell()
    if len(data) - offset != length * expected.itemsize:
        raise ValueError("array payload has the wrong size")
    return np.frombuffer(data, dtype=expected, count=length, offset=offset)


def npy_array(vector: np.ndarray) -> Array:
    """A Flower Array holding exactly the bytes `Array(vector)` holds (np.save's .npy format), written with one
    copy instead of np.save's two: the masked update is model-sized and every site sends one each round."""
    vector = np.ascontiguousarray(vector)
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, npy_format.header_data_from_array_1_0(vector))
    data = b"".join([header.getvalue(), memoryview(vector).cast("B")])
    return Array(dtype=str(vector.dtype), shape=tuple(vector.shape), stype="numpy.ndarray", data=data)
