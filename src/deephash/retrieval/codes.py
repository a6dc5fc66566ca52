"""Binary codes: binarise, pack to bytes (most significant bit first), and code files (``.npz``).

A code file holds ``codes`` (packed uint8 ``(N, ceil(bits/8))``), ``labels`` (int64 ``(N,)`` or
``(N, C)`` multi-hot), ``bits`` (0-d int64) and, only when the ids are not ``0..N-1``, ``ids``
(int64 ``(N,)``). It is read with ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from deephash._io import atomic_savez
from deephash.errors import CodeLengthError, DataFormatError, DeephashError, NotFoundError, first_line
from deephash._tensors import as_numpy
from deephash.signs import is_plus, sign

if TYPE_CHECKING:
    import torch


def n_bytes(bits: int) -> int:
    """Bytes needed to hold ``bits`` bits: ``ceil(bits / 8)``."""
    return (int(bits) + 7) // 8


def binarize(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Sign of ``x`` as float ``{-1, +1}`` with ``0 -> +1`` (:func:`deephash.signs.sign`); same type and shape."""
    return sign(x)


def code_bits(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    """The bits of unpacked codes: bool ``(N, bits)``, True for a 1 bit.

    How the input is read (by its dtype first, so a real-valued output is never taken for bits):

    - bool: as bits (True is 1);
    - floats: as signs, a 1 bit where the value is ``>= 0`` (the sign rule, 0 ↦ +1:
      :func:`deephash.signs.is_plus`), so ±1 codes and real-valued outputs pack by their sign,
      exact zeros as 1 bits. Floats holding only 0 and 1 (with a 0) are refused: they are bits,
      which as signs would all be 1 bits; pass such bits as bool (``x > 0.5``);
    - integers: as signs when any value is negative (±1 or {-1, 0, +1}: 0 is a 1 bit), else as
      bits, which must then be 0 or 1 (``uint8`` bits from :func:`unpack_codes`, {0, 1} int64).

    Raises:
        DeephashError: not 2-D, NaN or infinite values, floats holding only 0 and 1, or bits
        other than 0 and 1.
    """
    array = as_numpy(codes)
    if array.ndim != 2:
        raise DeephashError(f"codes must be 2-D (N, bits), got shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DeephashError(f"codes must be bool, integers or floats, got {array.dtype}")
    if array.size == 0:
        return array.astype(bool)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DeephashError("codes hold NaN or infinite values")
        zero = array == 0
        if zero.any() and (zero | (array == 1)).all():
            raise DeephashError("float codes hold only 0 and 1: floats are signs (0 counts as +1), so these bits would "
                                "all pack as 1 bits; pass bits as bool (codes > 0.5) or ±1 codes")
        return np.asarray(is_plus(array))
    if (array < 0).any():
        return np.asarray(is_plus(array))
    if array.max() > 1:
        raise DeephashError(f"integer codes without a negative value are bits and must be 0 or 1, got {int(array.max())} (packed codes?)")
    return array.astype(bool)


def pack_codes(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    """Pack binary codes into bytes, most significant bit first, zero padded.

    Bit ``j`` of a code goes to byte ``j // 8`` at bit position ``7 - j % 8``
    (``np.packbits(..., bitorder="big")``).

    Args:
        codes: ``(N, bits)`` numpy or torch: bool or integer {0, 1} bits, or ±1 / real-valued
            signs packed by the sign rule (0 ↦ +1; floats holding only 0 and 1 are refused);
            :func:`code_bits` says how each input is read.

    Returns:
        uint8 ``(N, ceil(bits / 8))``.
    """
    return np.packbits(code_bits(codes), axis=1, bitorder="big")


def unpack_codes(packed: torch.Tensor | np.ndarray, bits: int) -> np.ndarray:
    """Unpack ``uint8 (N, ceil(bits/8))`` codes into ``uint8 (N, bits)`` with values in ``{0, 1}``."""
    array = as_numpy(packed)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise DeephashError(f"packed codes must be uint8 (N, bytes), got {array.dtype} {array.shape}")
    if array.shape[1] != n_bytes(bits):
        raise CodeLengthError(
            f"packed codes have {array.shape[1]} bytes but {bits}-bit codes need {n_bytes(bits)} bytes"
        )
    return np.unpackbits(array, axis=1, count=int(bits), bitorder="big")


def padding_is_zero(packed: np.ndarray, bits: int) -> bool:
    """Whether the unused low bits of the last byte of every code are zero."""
    spare = n_bytes(bits) * 8 - int(bits)
    if spare == 0 or packed.shape[0] == 0:
        return True
    return not (packed[:, -1] & np.uint8((1 << spare) - 1)).any()


@dataclass(frozen=True)
class CodeSet:
    """Codes read from a code file.

    Attributes:
        codes: packed uint8 ``(N, ceil(bits/8))``.
        labels: int64 ``(N,)`` or multi-hot ``(N, C)``.
        bits: code length in bits.
        ids: int64 ``(N,)``; ``0..N-1`` when the file stores none.
        paths: ``(N,)`` strings (image paths relative to their folder), or None.
        rerank: float16 ``(N, D)`` re-rank vectors (models with ``model.rerank``), or None.
        root: the folder ``paths`` are relative to (absolute, as encoded), or None.
    """

    codes: np.ndarray
    labels: np.ndarray
    bits: int
    ids: np.ndarray
    paths: np.ndarray | None = None
    rerank: np.ndarray | None = None
    root: str | None = None

    def full_paths(self) -> list[str] | None:
        """Each item's path joined to :attr:`root` (as stored when the file has no root); None without paths."""
        if self.paths is None:
            return None
        return [str(p) if self.root is None else str(Path(self.root) / str(p)) for p in self.paths]

    def __len__(self) -> int:
        return int(self.codes.shape[0])


def save_codes(
    path: str | os.PathLike,
    codes: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    bits: int,
    ids: torch.Tensor | np.ndarray | None = None,
    paths: Sequence[str] | np.ndarray | None = None,
    rerank: np.ndarray | None = None,
    root: str | os.PathLike | None = None,
) -> None:
    """Write a code file atomically.

    Args:
        path: destination ``.npz``.
        codes: packed uint8 ``(N, ceil(bits/8))``, or unpacked ``(N, bits)`` codes (any dtype but
            uint8; bool or integer {0, 1} bits, ±1 or real-valued signs: as :func:`pack_codes`),
            which are packed here.
        labels: int ``(N,)`` or multi-hot ``(N, C)``; stored as int64.
        bits: code length in bits (``>= 1``).
        ids: int64 ``(N,)``, the items' ids; default ``0..N-1``.
        paths: optional ``(N,)`` strings, e.g. each image's path relative to its folder.
        rerank: optional float ``(N, D)`` re-rank vectors, stored as float16.
        root: the folder ``paths`` are relative to (stored as a 0-d string; needs ``paths``).
    """
    bits = int(bits)
    if bits < 1:
        raise DeephashError(f"bits must be >= 1, got {bits}")
    array = as_numpy(codes)
    if array.dtype != np.uint8:
        if array.ndim != 2 or array.shape[1] != bits:
            raise CodeLengthError(f"unpacked codes have shape {array.shape} but bits is {bits}")
        array = pack_codes(array)
    if array.ndim != 2 or array.shape[1] != n_bytes(bits):
        raise CodeLengthError(f"packed codes have shape {array.shape} but {bits}-bit codes need {n_bytes(bits)} bytes")
    if not padding_is_zero(array, bits):
        raise DeephashError(f"packed {bits}-bit codes have non-zero padding bits")
    label_array = as_numpy(labels).astype(np.int64)
    if label_array.ndim not in (1, 2) or label_array.shape[0] != array.shape[0]:
        raise DeephashError(f"labels of shape {label_array.shape} do not match {array.shape[0]} codes")
    arrays = {"codes": array, "labels": label_array, "bits": np.array(bits, dtype=np.int64)}
    id_array = np.arange(array.shape[0], dtype=np.int64) if ids is None else as_numpy(ids).astype(np.int64).reshape(-1)
    if id_array.shape[0] != array.shape[0]:
        raise DeephashError(f"{id_array.shape[0]} ids do not match {array.shape[0]} codes")
    arrays["ids"] = id_array
    if paths is not None:
        arrays["paths"] = np.asarray([str(p) for p in paths], dtype=np.str_).reshape(-1)
        if arrays["paths"].shape[0] != array.shape[0]:
            raise DeephashError(f"{arrays['paths'].shape[0]} paths do not match {array.shape[0]} codes")
    if rerank is not None:
        arrays["rerank"] = np.asarray(rerank, dtype=np.float16)
        if arrays["rerank"].ndim != 2 or arrays["rerank"].shape[0] != array.shape[0]:
            raise DeephashError(f"re-rank vectors of shape {arrays['rerank'].shape} do not match {array.shape[0]} codes")
    if root is not None:
        if paths is None:
            raise DeephashError("a code file's root needs paths relative to it")
        arrays["root"] = np.array(str(root), dtype=np.str_)
    atomic_savez(path, **arrays)


def load_codes(path: str | os.PathLike) -> CodeSet:
    """Read and validate a code file written by :func:`save_codes`.

    Raises:
        NotFoundError: the file does not exist.
        DataFormatError: the file is malformed; the message names the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"code file {path} does not exist")

    def bad(problem: str) -> DataFormatError:
        return DataFormatError(f"code file {path}: {problem}")

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:  # noqa: BLE001 - zip and .npy header parsing raise SyntaxError, TokenError...
        raise bad(f"not a readable .npz file ({first_line(error)})") from None
    for key in ("codes", "labels", "bits"):
        if key not in arrays:
            raise bad(f"missing key '{key}'")
    codes, labels, bits_array = arrays["codes"], arrays["labels"], arrays["bits"]
    if bits_array.shape != () or not np.issubdtype(bits_array.dtype, np.integer) or int(bits_array) < 1:
        raise bad(f"'bits' must be a positive 0-d integer, got {bits_array.dtype} {bits_array.shape}")
    bits = int(bits_array)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise bad(f"'codes' must be uint8 (N, bytes), got {codes.dtype} {codes.shape}")
    if codes.shape[1] != n_bytes(bits):
        raise bad(f"'codes' have {codes.shape[1]} bytes per code but {bits} bits need {n_bytes(bits)}")
    if not padding_is_zero(codes, bits):
        raise bad(f"padding bits beyond bit {bits} are not zero")
    if labels.dtype != np.int64 or labels.ndim not in (1, 2):
        raise bad(f"'labels' must be int64 (N,) or (N, C), got {labels.dtype} {labels.shape}")
    if labels.shape[0] != codes.shape[0]:
        raise bad(f"{labels.shape[0]} labels for {codes.shape[0]} codes")
    if "ids" in arrays:
        ids = arrays["ids"]
        if ids.dtype != np.int64 or ids.shape != (codes.shape[0],):
            raise bad(f"'ids' must be int64 ({codes.shape[0]},), got {ids.dtype} {ids.shape}")
    else:
        ids = np.arange(codes.shape[0], dtype=np.int64)
    paths = arrays.get("paths")
    if paths is not None and (paths.dtype.kind != "U" or paths.shape != (codes.shape[0],)):
        raise bad(f"'paths' must be ({codes.shape[0]},) strings, got {paths.dtype} {paths.shape}")
    rerank = arrays.get("rerank")
    if rerank is not None and (rerank.dtype != np.float16 or rerank.ndim != 2 or rerank.shape[0] != codes.shape[0]):
        raise bad(f"'rerank' must be float16 ({codes.shape[0]}, D), got {rerank.dtype} {rerank.shape}")
    root = arrays.get("root")
    if root is not None and (root.dtype.kind != "U" or root.shape != () or paths is None):
        raise bad(f"'root' must be a 0-d string beside 'paths', got {root.dtype} {root.shape}")
    return CodeSet(codes=codes, labels=labels, bits=bits, ids=ids, paths=paths, rerank=rerank,
                   root=None if root is None else str(root))
