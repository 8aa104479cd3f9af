"""NestedTensor padding, masks, collate and TorchScript."""
import torch

from util.misc import NestedTensor as MiscNestedTensor
from util.nested_tensor import NestedTensor, collate_fn, nested_tensor_from_tensor_list


def test_pads_bottom_right_and_marks_padding():
    a = torch.ones(3, 4, 5)
    b = 2 * torch.ones(3, 6, 2)
    nt = nested_tensor_from_tensor_list([a, b])
    assert nt.tensors.shape == (2, 3, 6, 5)
    assert nt.mask.dtype == torch.bool and nt.mask.shape == (2, 6, 5)
    assert torch.equal(nt.tensors[0, :, :4, :5], a) and nt.tensors[0, :, 4:].abs().sum() == 0
    assert torch.equal(nt.tensors[1, :, :6, :2], b) and nt.tensors[1, :, :, 2:].abs().sum() == 0
    assert nt.mask[0].sum() == 6 * 5 - 4 * 5 and not nt.mask[0, :4, :5].any()
    assert nt.mask[1].sum() == 6 * 5 - 6 * 2 and not nt.mask[1, :, :2].any()
    tensors, mask = nt.decompose()
    assert tensors is nt.tensors and mask is nt.mask


def test_to_and_original_import_name():
    nt = nested_tensor_from_tensor_list([torch.ones(3, 2, 2)]).to(torch.device("cpu"), non_blocking=True)
    assert isinstance(nt, MiscNestedTensor) and nt.mask.shape == (1, 2, 2)
    assert NestedTensor(torch.zeros(1), None).to(torch.device("cpu")).mask is None


def test_collate_fn():
    batch = [(torch.zeros(3, 4, 4), {"id": 1}), (torch.zeros(3, 2, 8), {"id": 2})]
    images, targets = collate_fn(batch)
    assert images.tensors.shape == (2, 3, 4, 8)
    assert targets == ({"id": 1}, {"id": 2})


def test_scripted_padding_is_identical():
    scripted = torch.jit.script(nested_tensor_from_tensor_list)
    images = [torch.randn(3, 5, 7), torch.randn(3, 6, 4)]
    a, b = scripted(images), nested_tensor_from_tensor_list(images)
    assert torch.equal(a.tensors, b.tensors) and torch.equal(a.mask, b.mask)


def test_traced_padding_follows_new_sizes():
    import warnings

    def pad_two(a, b):
        nt = nested_tensor_from_tensor_list([a, b])
        return nt.tensors, nt.mask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(pad_two, (torch.randn(3, 4, 5), torch.randn(3, 6, 2)))
    a, b = torch.randn(3, 7, 3), torch.randn(3, 2, 9)  # other sizes than at tracing time
    tensors, mask = traced(a, b)
    expected = nested_tensor_from_tensor_list([a, b])
    assert tensors.shape == (2, 3, 7, 9)
    assert torch.equal(tensors, expected.tensors) and torch.equal(mask, expected.mask)
