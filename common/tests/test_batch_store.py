import pytest
import torch

from common.batch_store import BatchStore


def _batches():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, 3, generator=generator), torch.randn(1, 5, 3, generator=generator)]


def test_round_trip_of_ragged_batches_in_one_buffer():
    batches = _batches()
    store = BatchStore.of(batches, "cpu")
    assert len(store) == 2 and store.complete
    for stored, original in zip(store, batches, strict=True):
        assert torch.equal(stored, original)
    assert store[0].untyped_storage().data_ptr() == store[1].untyped_storage().data_ptr()


def test_other_kinds_share_the_rows_but_not_the_width():
    store = BatchStore.of(_batches(), "cpu")
    wide = store.like()
    assert not wide.complete and wide.get(0) is None
    wide[1] = torch.ones(1, 5, 7)
    assert wide.get(0) is None and torch.equal(wide[1], torch.ones(1, 5, 7))
    with pytest.raises(KeyError, match="batch 0"):
        wide[0]


def test_overwriting_a_batch_with_a_value_computed_from_it():
    store = BatchStore.of(_batches(), "cpu")
    expected = store[0] * 2 + 1
    store[0] = store[0] * 2 + 1
    assert torch.equal(store[0], expected)


def test_clone_is_independent():
    store = BatchStore.of(_batches(), "cpu")
    copy = store.clone()
    store[0] = torch.zeros(2, 5, 3)
    assert torch.equal(copy[0], _batches()[0])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [(torch.zeros(2, 4, 3), "leading shape \\(2, 5\\)"), (torch.zeros(2, 5, 4), "expected \\[..., 3\\]"),
     (torch.zeros(2, 5, 3, dtype=torch.float64), "torch.float32")],
)
def test_a_batch_of_another_shape_or_dtype_is_refused(tensor, message):
    store = BatchStore.of(_batches(), "cpu")
    with pytest.raises(ValueError, match=message):
        store[0] = tensor
