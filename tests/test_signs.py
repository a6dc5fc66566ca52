"""The one sign rule (0 ↦ +1): deephash.signs, and every place that binarises agrees with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deephash.errors import DeephashError
from deephash.losses import CSQLoss
from deephash.models import HashHead, sign_codes
from deephash.models.pca_codes import pca_codes
from deephash.retrieval import HashIndex, binarize, pack_codes, save_codes
from deephash.signs import is_plus, sign

#: Exact zeros (both signs of zero) next to the smallest values either side of them.
BOUNDARY = [-1.0, -1e-30, -0.0, 0.0, 1e-30, 2.0]
EXPECTED = [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def _pack_loop(rows: list[list[float]]) -> np.ndarray:
    """Bytes of the codes by a loop over bits: bit j is 1 where value >= 0, MSB first."""
    out = np.zeros((len(rows), (len(rows[0]) + 7) // 8), np.uint8)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if value >= 0:
                out[i, j // 8] |= 1 << (7 - j % 8)
    return out


def test_sign_maps_zero_to_plus_one_for_tensors_and_arrays():
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = torch.tensor(BOUNDARY, dtype=dtype)
        if dtype is torch.float16:  # 1e-30 underflows to zero in half precision
            x = torch.tensor([-1.0, -1e-4, -0.0, 0.0, 1e-4, 2.0], dtype=dtype)
        out = sign(x)
        assert out.dtype == dtype and out.tolist() == EXPECTED
    assert sign(np.array(BOUNDARY)).tolist() == EXPECTED
    assert sign(np.array([-2, 0, 3])).dtype == np.float32 and sign(torch.tensor([-2, 0, 3])).tolist() == [-1.0, 1.0, 1.0]
    assert is_plus(torch.tensor(BOUNDARY)).tolist() == [value >= 0 for value in BOUNDARY]


def test_sign_carries_no_gradient():
    u = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    assert not sign(u).requires_grad


def test_every_binarising_place_maps_zero_to_plus_one():
    zeros = torch.zeros(2, 8)
    assert sign_codes(zeros).eq(1).all() and torch.as_tensor(binarize(zeros)).eq(1).all()
    head = HashHead(4, 8).eval()
    torch.nn.init.zeros_(head.linear.weight)
    torch.nn.init.zeros_(head.linear.bias)
    assert head(torch.randn(3, 4)).eq(1).all()
    assert pca_codes(torch.randn(3, 4), torch.zeros(4), torch.zeros(4, 8)).eq(1).all()
    csq = CSQLoss(bits=16, n_classes=2)
    both = torch.tensor([[1, 1]])
    total = csq.centers[0] + csq.centers[1]  # 0 where the two centers differ
    assert (total == 0).any()
    assert csq.targets(both)[0].tolist() == torch.where(total >= 0, 1.0, -1.0).tolist()
    signed = torch.cat([torch.full((2, 1), -0.5), zeros[:, 1:]], dim=1)  # a negative value: the zeros are signs
    assert pack_codes(signed).tolist() == [[0b01111111]] * 2 == _pack_loop(signed.tolist()).tolist()


def test_pack_codes_reads_signed_input_by_the_sign_rule():
    example = [[0, 1, -1, 1, 1, 1, 1, 1]]
    assert pack_codes(example).tolist() == [[223]] == _pack_loop(example).tolist()
    rows = [BOUNDARY + [0.0, -3.0], [0.0] * 4 + [-0.5] * 4]
    for codes in (np.array(rows), torch.tensor(rows), torch.tensor(rows, dtype=torch.float64)):
        np.testing.assert_array_equal(pack_codes(codes), _pack_loop(rows))
    # ±1 integers and {-1, 0, +1} integers: 0 is a 1 bit as soon as a negative value marks the input signed
    np.testing.assert_array_equal(pack_codes(np.array([[-1, 0, 1, 0, -1, 0, 1, -1]])), _pack_loop([[-1, 0, 1, 0, -1, 0, 1, -1]]))


def test_pack_codes_reads_unsigned_bool_and_zero_one_input_as_bits():
    bits = [[0, 1, 1, 0, 0, 0, 0, 1]]  # 0b01100001
    for codes in (np.array(bits, np.uint8), np.array(bits, bool), np.array(bits), torch.tensor(bits), torch.tensor(bits, dtype=torch.int32)):
        assert pack_codes(codes).tolist() == [[0b01100001]]


#: Floats holding only exact 0s and 1s with a 0 (-0.0 is a 0): bits, which as signs would all be 1 bits.
FLOAT_BITS = [[0, 1, 1, 0, 0, 0, 0, 1], [0.0] * 8, [-0.0, 1, 1, 1, 1, 1, 1, 1]]
#: The nearest floats that are not such bits: one value just off 0 or 1, or a negative one, or no 0.
FLOAT_SIGNS = [[0, 1, 1, 0, 0, 0, 0, np.nextafter(1.0, 2.0)], [0, 1, 1, 0, 0, 0, 0, np.nextafter(1.0, 0.0)],
               [0, 1, 1, 0, 0, 0, 0, -1e-30], [1e-30, 1, 1, 1e-30, 1e-30, 1e-30, 1e-30, 1], [1.0] * 8,
               [0, 1, 1, 0, 0, 0, 0, 2]]


def test_pack_codes_refuses_float_bits_and_reads_every_other_float_as_signs():
    """Bug: float {0, 1} bits packed silently as all 1 bits (floats are signs, 0 ↦ +1)."""
    for rows in FLOAT_BITS:
        for codes in (np.array([rows], np.float32), np.array([rows], np.float64), torch.tensor([rows], dtype=torch.float16)):
            with pytest.raises(DeephashError, match=r"^float codes hold only 0 and 1: .*pass bits as bool") as caught:
                pack_codes(codes)
            assert "\n" not in str(caught.value)
        assert pack_codes(np.array([rows]) > 0.5).tolist() == _pack_loop([[v - 0.5 for v in rows]]).tolist()
    for rows in FLOAT_SIGNS:
        for codes in (np.array([rows], np.float64), torch.tensor([rows], dtype=torch.float64)):
            assert pack_codes(codes).tolist() == _pack_loop([rows]).tolist()
    mixed = FLOAT_BITS[:1] + [[-1.0] * 8]  # the whole array decides: a negative value anywhere makes it signs
    assert pack_codes(np.array(mixed, np.float64)).tolist() == _pack_loop(mixed).tolist()
    with pytest.raises(DeephashError, match="float codes hold only 0 and 1"):
        pack_codes(np.array(FLOAT_BITS[:1] + [[1.0] * 8], np.float64))


def test_index_and_code_files_refuse_float_bits(tmp_path):
    bits = np.array(FLOAT_BITS[:1], np.float32)
    index = HashIndex(8, backend="torch")
    for call in (lambda: index.add(bits), lambda: index.search(bits, 1),
                 lambda: save_codes(tmp_path / "c.npz", bits, np.zeros(1, np.int64), 8)):
        with pytest.raises(DeephashError, match="pass bits as bool"):
            call()
    assert index.ntotal == 0 and not (tmp_path / "c.npz").exists()


def test_pack_codes_rejects_what_is_neither_bits_nor_signs():
    with pytest.raises(DeephashError, match="must be 0 or 1"):
        pack_codes(np.array([[0, 2]], np.uint8))
    with pytest.raises(DeephashError, match="must be 0 or 1"):
        pack_codes(np.array([[0, 1, 3]]))
    with pytest.raises(DeephashError, match="NaN"):
        pack_codes(np.array([[0.0, float("nan")]]))
    with pytest.raises(DeephashError, match="2-D"):
        pack_codes(np.zeros(8))
