"""Readers for the files image data sets ship in: IDX (MNIST, Fashion-MNIST, KMNIST), CIFAR-10/100
python batches. Image files and folders: :mod:`deephash.data.images`.

Every reader validates a file before it allocates anything sized by the file's header, and turns
every failure (corrupt, truncated, hostile) into a one-line :class:`~deephash.errors.DataFormatError`
that names the file. CIFAR pickles are loaded by a restricted unpickler: no code in them runs.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from deephash.errors import DataFormatError, NotFoundError, first_line

#: IDX type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
#: Largest IDX payload read_idx accepts (bytes); a header that claims more is refused unread.
MAX_IDX_BYTES = 1 << 34
_MAX_IDX_NDIM = 4
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 24



def _read_exact(handle: IO[bytes], n: int, path: Path) -> bytes:
    """Read exactly ``n`` bytes in bounded chunks (memory grows only with data actually present)."""
    out = bytearray()
    while len(out) < n:
        chunk = handle.read(min(_CHUNK, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _parse_idx_header(head: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    if len(head) < 4:
        raise DataFormatError(f"{path}: not an IDX file: {len(head)} bytes, shorter than the 4-byte magic")
    if head[0] != 0 or head[1] != 0:
        raise DataFormatError(f"{path}: not an IDX file: bad magic {head[:4].hex()} (expected 0000TTNN)")
    if head[2] not in IDX_DTYPES:
        raise DataFormatError(f"{path}: IDX type code 0x{head[2]:02x} is unknown (expected 08, 09, 0b, 0c, 0d or 0e)")
    ndim = head[3]
    if not 1 <= ndim <= _MAX_IDX_NDIM:
        raise DataFormatError(f"{path}: IDX header claims {ndim} dimensions (expected 1 to {_MAX_IDX_NDIM})")
    return IDX_DTYPES[head[2]], (ndim,)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, detected by content, not by name).

    Args:
        path: an IDX file such as ``train-images-idx3-ubyte.gz``.

    Returns:
        An array of the file's shape in its declared dtype, native byte order: ``uint8`` for
        MNIST-like images ``(N, 28, 28)`` and labels ``(N,)``.

    Raises:
        NotFoundError: the file does not exist.
        DataFormatError: bad magic, unknown type, implausible dimensions, truncated or trailing
            data, or a corrupt gzip stream.
    """
    path = Path(path)
    try:
        raw = open(path, "rb")
    except FileNotFoundError as err:
        raise NotFoundError(f"{path}: no such file") from err
    except OSError as err:
        raise DataFormatError(f"{path}: cannot open: {err.strerror or err}") from err
    compressed = False
    with raw:
        try:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as handle:
                    return _read_idx_stream(handle, path, size=None)
            return _read_idx_stream(raw, path, size=os.fstat(raw.fileno()).st_size)
        except DataFormatError:
            raise
        except (OSError, EOFError, zlib.error) as err:
            what = "corrupt gzip stream" if compressed else "read error"
            raise DataFormatError(f"{path}: {what}: {err}") from err


def _read_idx_stream(handle: IO[bytes], path: Path, size: int | None) -> np.ndarray:
    head = _read_exact(handle, 4, path)
    dtype, (ndim,) = _parse_idx_header(head, path)
    dims_raw = _read_exact(handle, 4 * ndim, path)
    if len(dims_raw) != 4 * ndim:
        raise DataFormatError(f"{path}: truncated IDX header: expected {4 * ndim} bytes of dimensions, got {len(dims_raw)}")
    shape = tuple(int.from_bytes(dims_raw[4 * i : 4 * i + 4], "big") for i in range(ndim))
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if expected > MAX_IDX_BYTES:
        raise DataFormatError(f"{path}: IDX header claims shape {shape}, {expected} bytes (more than the {MAX_IDX_BYTES}-byte limit)")
    if size is not None:  # raw file: compare with the file size before reading anything
        got = size - 4 - 4 * ndim
        if got != expected:
            what = "truncated" if got < expected else "trailing data"
            raise DataFormatError(f"{path}: {what}: shape {shape} needs {expected} bytes of data, the file has {got}")
    payload = _read_exact(handle, expected + 1, path)
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "trailing data"
        got_text = str(len(payload)) if len(payload) <= expected else "more"
        raise DataFormatError(f"{path}: {what}: shape {shape} needs {expected} bytes of data, got {got_text}")
    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


# ----------------------------------------------------------------------------------------- CIFAR


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol < 3; only Latin-1 is admitted."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refuses _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_SAFE_DTYPES = {"u1", "i1", "b1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"}


class _DTypeProxy:
    """Stands in for ``numpy.dtype`` while unpickling: numpy never sees untrusted dtype state."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        self.spec = spec.decode("latin1") if isinstance(spec, bytes) else spec
        self.order = "|"

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        self.order = order.decode("latin1") if isinstance(order, bytes) else order

    def resolve(self) -> np.dtype:
        if self.spec not in _SAFE_DTYPES or self.order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"refuses numpy dtype {self.spec!r} with byte order {self.order!r}")
        order = "=" if self.order == "|" else self.order
        return np.dtype(self.spec).newbyteorder(order)


def _build_array(data: Any, dtype: Any, shape: Any, fortran: Any) -> np.ndarray:
    """A numpy array from validated pickled pieces (plain bytes, a safe dtype, a sane shape)."""
    if not isinstance(dtype, _DTypeProxy) or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("array state is not (bytes, dtype)")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 8:
        raise pickle.UnpicklingError(f"array shape {shape!r} is not a tuple of non-negative integers")
    resolved = dtype.resolve()
    if int(np.prod(shape, dtype=object)) * resolved.itemsize != len(data):
        raise pickle.UnpicklingError(f"array of shape {shape} holds {len(data)} bytes, not {int(np.prod(shape, dtype=object)) * resolved.itemsize}")
    array = np.frombuffer(bytes(data), dtype=resolved).reshape(shape, order="F" if fortran else "C")
    return array.astype(resolved.newbyteorder("="))


class _ArrayProxy:
    """Stands in for ``numpy.ndarray`` while unpickling; :func:`_build_array` makes the real one."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("array state is not a 4- or 5-tuple")
        shape, dtype, fortran, data = state[-4:]
        self.array = _build_array(data, dtype, shape, fortran)


def _reconstruct(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> _ArrayProxy:
    if cls is not _ArrayProxy:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    return _ArrayProxy()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    order = order.decode("latin1") if isinstance(order, bytes) else order
    return _build_array(buffer, dtype, shape, order == "F")


def _safe_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = _frombuffer
    allowed[("numpy", "ndarray")] = _ArrayProxy
    allowed[("numpy", "dtype")] = _DTypeProxy
    return allowed


def _resolve(value: Any) -> Any:
    """Replace an unpickled array proxy by its array (None when its state never came)."""
    return value.array if isinstance(value, _ArrayProxy) else value


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals CIFAR batches contain: numpy arrays and dtypes."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file, encoding="bytes")
        self._allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refuses to load global {module}.{name}") from None


def _key(batch: dict, name: str) -> Any:
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    return None


def parse_cifar_batch(data: bytes, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse the bytes of a CIFAR-10/100 python batch; see :func:`read_cifar_batch`."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # the pickle machinery raises many types; none may leak
        raise DataFormatError(f"{path}: not a valid CIFAR batch: {first_line(err)}") from err
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path}: not a CIFAR batch: holds a {type(batch).__name__}, not a dict")
    images = _resolve(_key(batch, "data"))
    labels = _resolve(_key(batch, "labels"))
    if labels is None:
        labels = _resolve(_key(batch, "fine_labels"))
    if images is None or labels is None:
        raise DataFormatError(f"{path}: not a CIFAR batch: no 'data' and 'labels' (or 'fine_labels') entries")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        what = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataFormatError(f"{path}: CIFAR 'data' must be uint8 (N, 3072), got {what}")
    try:
        labels = np.asarray(labels)
    except Exception as err:
        raise DataFormatError(f"{path}: CIFAR labels are not a list of integers") from err
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise DataFormatError(
            f"{path}: CIFAR labels must be {len(images)} integers, got {labels.dtype} {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= 1 << 16):
        raise DataFormatError(f"{path}: CIFAR labels out of range [0, 65535]: {labels.min()}..{labels.max()}")
    images = np.ascontiguousarray(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR-10/100 python batch (``data_batch_1``, ``test_batch``, ``train``, ``test``).

    The pickle is loaded by a restricted unpickler that admits only numpy arrays and dtypes,
    so a hostile file cannot run code.

    Numpy arrays and dtypes are rebuilt from validated plain pieces, so numpy never receives
    untrusted pickled state.

    Args:
        path: the batch file.

    Returns:
        ``(images uint8 (N, 32, 32, 3), labels int64 (N,))``; CIFAR-100 gives its fine labels.

    Raises:
        NotFoundError: the file does not exist.
        DataFormatError: the file is not a valid CIFAR batch, or references other globals.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise NotFoundError(f"{path}: no such file") from err
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read: {err.strerror or err}") from err
    return parse_cifar_batch(data, path)
