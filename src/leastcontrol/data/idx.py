"""Reader and writer for the IDX file format used by MNIST and its relatives.

An IDX file is: two zero bytes, a dtype code byte, a byte giving the number of
dimensions ``ndim``, ``ndim`` big-endian uint32 sizes, then the array data in
big-endian C order.  Files may be gzip-compressed; compression is detected by
the gzip magic bytes, not by the file extension.
"""
from __future__ import annotations

import gzip as _gzip
import math
import os
import zlib
from pathlib import Path
from typing import Union

import numpy as np

from ..atomic import atomic_target
from ..errors import DataFormatError

PathLike = Union[str, "os.PathLike[str]"]

#: IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_BY_KIND: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}

_GZIP_MAGIC = b"\x1f\x8b"


def is_gzip_bytes(head: bytes) -> bool:
    """Return True if ``head`` starts with the gzip magic bytes."""
    return head[:2] == _GZIP_MAGIC


def _read_payload(path: Path) -> bytes:
    """Read a file, transparently decompressing it if it is gzipped."""
    with open(path, "rb") as f:
        raw = f.read()
    if not is_gzip_bytes(raw):
        return raw
    try:
        return _gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt gzip data ({exc}); delete the file and fetch it again") from exc


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a numpy array.

    Args:
        path: file to read. Gzip compression is detected from the content.

    Returns:
        A writable array in native byte order with the shape stored in the file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        DataFormatError: bad magic number, unknown dtype code, corrupt gzip
            data, or a data length that does not match the header.
    """
    path = Path(path)
    data = _read_payload(path)
    name = str(path)
    if len(data) < 4:
        raise DataFormatError(f"{name}: not an IDX file (only {len(data)} bytes, header needs at least 4)")
    if data[0] != 0 or data[1] != 0:
        raise DataFormatError(
            f"{name}: not an IDX file (bad magic number {data[:4].hex()}; expected it to start with 0000)"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataFormatError(f"{name}: unknown IDX dtype code 0x{code:02X} (valid codes: {valid})")
    if ndim == 0:
        raise DataFormatError(f"{name}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataFormatError(
            f"{name}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header_len})"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes after the data"
        raise DataFormatError(
            f"{name}: size mismatch ({what}): header says shape {dims} of {dtype.name} "
            f"= {expected} data bytes, file has {actual}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=header_len).reshape(dims)
    # astype always copies, which makes the array writable and native-endian.
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array: np.ndarray, gzip: bool = False) -> Path:
    """Write an array as an IDX file, atomically (temp file + ``os.replace``).

    Args:
        path: destination file; its directory must exist.
        array: array-like of dtype uint8, int8, int16, int32, float32 or
            float64 with at least one dimension.
        gzip: gzip-compress the output.

    Returns:
        The path written.

    Raises:
        ValueError: unsupported dtype, zero dimensions, too many dimensions or
            a dimension that does not fit in uint32.
    """
    arr = np.asarray(array)
    code = _CODE_BY_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        supported = ", ".join(dt.newbyteorder("=").name for dt in IDX_DTYPES.values())
        raise ValueError(f"IDX cannot store dtype {arr.dtype}; supported: {supported} (cast the array first)")
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got an array with {arr.ndim}")
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"IDX dimensions must fit in uint32, got shape {arr.shape}")
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    path = Path(path)
    with atomic_target(path) as tmp:
        if gzip:
            with open(tmp, "wb") as raw, _gzip.GzipFile(
                filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0
            ) as f:
                f.write(payload)
        else:
            with open(tmp, "wb") as f:
                f.write(payload)
    return path
