"""The reference semantics and the dispatchers' argument checks."""

import pytest
import torch
import torch.nn.functional as F

import packnet_kernels as pk
from packnet_kernels.reference import effective_weight, masked_conv2d_ref, masked_linear_ref


def _ids(shape, high=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=generator, dtype=torch.uint8)


def test_effective_weight_is_a_select_over_tasks_1_to_t():
    weight = torch.arange(1.0, 7.0).reshape(2, 3)
    task_ids = torch.tensor([[0, 1, 2], [3, 1, 255]], dtype=torch.uint8)
    assert torch.equal(effective_weight(weight, task_ids, 1), torch.tensor([[0.0, 2.0, 0.0], [0.0, 5.0, 0.0]]))
    assert torch.equal(effective_weight(weight, task_ids, 3), torch.tensor([[0.0, 2.0, 3.0], [4.0, 5.0, 0.0]]))
    assert torch.equal(effective_weight(weight, task_ids, 255), torch.tensor([[0.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))


@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_unowned_inf_and_nan_never_leak(poison):
    weight = torch.randn(5, 7, dtype=torch.float64)
    task_ids = _ids((5, 7), high=3)
    task_ids[0, 0], task_ids[1, 1] = 3, 0  # owned by a later task, and free
    weight[0, 0] = weight[1, 1] = poison
    x = torch.randn(4, 7, dtype=torch.float64)
    y = masked_linear_ref(x, weight, task_ids, 2)
    assert torch.isfinite(y).all()
    clean = weight.clone()
    clean[0, 0] = clean[1, 1] = 0.0
    assert torch.equal(y, masked_linear_ref(x, clean, task_ids, 2))


def test_linear_matches_a_hand_masked_float64_matmul_with_epilogue():
    weight, task_ids = torch.randn(6, 5, dtype=torch.float64), _ids((6, 5))
    x, bias = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    scale, shift = torch.rand(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    mask = ((task_ids > 0) & (task_ids <= 2)).double()
    expected = torch.relu((x @ (weight * mask).T + bias) * scale + shift)
    got = pk.masked_linear(x, weight, task_ids, 2, bias, scale=scale, shift=shift, relu=True, backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_conv2d_matches_a_hand_masked_float64_conv():
    weight, task_ids = torch.randn(4, 3, 3, 3, dtype=torch.float64), _ids((4, 3, 3, 3))
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    mask = ((task_ids > 0) & (task_ids <= 3)).double()
    expected = F.conv2d(x, weight * mask, None, 2, 1)
    torch.testing.assert_close(masked_conv2d_ref(x, weight, task_ids, 3, None, 2, 1), expected, rtol=0, atol=1e-12)
    same = pk.masked_conv2d(x, weight, task_ids, 3, padding="same", backend="reference")
    assert same.shape == (2, 4, 9, 7)


def test_auto_backend_on_cpu_is_the_reference():
    weight, task_ids, x = torch.randn(3, 4), _ids((3, 4)), torch.randn(2, 4)
    assert torch.equal(pk.masked_linear(x, weight, task_ids, 2), masked_linear_ref(x, weight, task_ids, 2))


LINEAR_ERRORS = [
    (dict(task=0), ValueError, r"task must be in 1\.\.255"),
    (dict(task=256), ValueError, r"task must be in 1\.\.255.*got 256"),
    (dict(task=1.0), TypeError, r"task must be an int"),
    (dict(task=True), TypeError, r"task must be an int"),
    (dict(task_ids=torch.zeros(3, 4, dtype=torch.int64)), TypeError, r"task_ids must be torch\.uint8.*int64"),
    (dict(task_ids=torch.zeros(4, 3, dtype=torch.uint8)), ValueError, r"task_ids must have the weight's shape"),
    (dict(x=torch.randn(2, 4, dtype=torch.float64)), TypeError, r"input dtype torch\.float64 does not match"),
    (dict(x=torch.randn(2, 5)), ValueError, r"last dimension must equal in_features=4"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
    (dict(weight=torch.randn(3, 4).to(torch.int32)), TypeError, r"weight dtype torch\.int32 is not supported"),
    (dict(x=torch.randn(2, 4, device="meta")), ValueError, r"weight is on cpu but the input is on meta"),
    (dict(backend="cuda"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize(("override", "error", "message"), LINEAR_ERRORS)
def test_masked_linear_rejects_bad_arguments(override, error, message):
    args = dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), task_ids=_ids((3, 4)), task=1, bias=None)
    backend = override.pop("backend", "reference")
    args.update(override)
    with pytest.raises(error, match=message):
        pk.masked_linear(args["x"], args["weight"], args["task_ids"], args["task"], args["bias"], backend=backend)


CONV_ERRORS = [
    (dict(groups=2), ValueError, r"input has 4 channels but weight expects in/groups=4 x groups=2"),
    (dict(stride=0), ValueError, r"stride must be >= 1"),
    (dict(padding="full"), ValueError, r"padding string must be 'same' or 'valid'"),
    (dict(padding="same", stride=2), ValueError, r"padding='same' needs stride 1"),
    (dict(x=torch.randn(4, 5, 5)), ValueError, r"input must be 4-D"),
    (dict(x=torch.randn(1, 4, 2, 2)), ValueError, r"smaller than the dilated kernel"),
]


@pytest.mark.parametrize(("override", "error", "message"), CONV_ERRORS)
def test_masked_conv2d_rejects_bad_arguments(override, error, message):
    args = dict(x=torch.randn(1, 4, 6, 6), stride=1, padding=0, groups=1)
    args.update(override)
    weight = torch.randn(6, 4, 3, 3)
    with pytest.raises(error, match=message):
        pk.masked_conv2d(
            args["x"],
            weight,
            _ids(weight.shape),
            1,
            None,
            args["stride"],
            args["padding"],
            1,
            args["groups"],
            backend="reference",
        )


def test_triton_backend_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pk.masked_linear(torch.randn(2, 4), torch.randn(3, 4), _ids((3, 4)), 1, backend="triton")
