"""Bad input: a clear error that says what was expected and what arrived, and nothing corrupted."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import batchnorm as bn
from batchnorm.functional import batch_norm, use_backend


def _snapshot(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_unchanged(layer: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = layer.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def _moved(layer: bn.BatchNorm2d) -> bn.BatchNorm2d:
    """A 3-channel 2d layer whose buffers are off their defaults, so any write would show."""
    layer(torch.randn(4, 3, 3, 3) * 2 + 1)
    return layer


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "layer, shape, expected",
    [
        (bn.BatchNorm2d(3), (8, 3, 32), "4D"),
        (bn.BatchNorm2d(3), (8, 3, 4, 4, 4), "4D"),
        (bn.BatchNorm1d(3), (2, 3, 4, 5), "2D or 3D"),
        (bn.BatchNorm3d(3), (2, 3, 4, 5), "5D"),
        (bn.BatchNorm(3), (3,), "at least 2 dimensions"),
    ],
    ids=["2d-got-3d", "2d-got-5d", "1d-got-4d", "3d-got-4d", "generic-got-1d"],
)
def test_wrong_rank_names_expected_and_received(layer, shape, expected):
    with pytest.raises(ValueError) as info:
        layer(torch.randn(shape))
    msg = str(info.value)
    assert expected in msg
    assert str(shape) in msg  # the shape that arrived
    assert f"{len(shape)}D" in msg or "at least" in msg


def test_wrong_rank_message_reads_like_the_style_guide():
    want = "expected 4D input (N, C, H, W), got 3D input of shape (8, 3, 32)"
    with pytest.raises(ValueError, match=re.escape(want)):
        bn.BatchNorm2d(3)(torch.randn(8, 3, 32))


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(affine=False), dict(affine=False, track_running_stats=False)],
    ids=["default", "no-affine", "no-params-no-buffers"],
)
def test_wrong_channel_count_names_expected_and_received(kwargs):
    layer = bn.BatchNorm2d(3, **kwargs)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(2, 4, 5, 5))
    msg = str(info.value)
    assert "(2, 4, 5, 5)" in msg  # received
    assert "(2, 3, 5, 5)" in msg  # expected
    assert "num_features" in msg


def test_wrong_channel_axis_for_sequences_hints_at_axis():
    layer = bn.BatchNorm(8)  # axis=1, but the data is (N, L, C)
    with pytest.raises(ValueError, match=r"axis=-1") as info:
        layer(torch.randn(4, 10, 8))
    assert "(4, 10, 8)" in str(info.value) and "(4, 8, 8)" in str(info.value)


def test_functional_wrong_parameter_shape_names_both_shapes():
    with pytest.raises(ValueError) as info:
        batch_norm(torch.randn(2, 3, 4), None, None, torch.ones(4), None, training=True)
    msg = str(info.value)
    assert "(4,)" in msg and "(2, 3, 4)" in msg and "(3,)" in msg


def test_functional_rank_and_axis_errors():
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*\(5,\)"):
        batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(ValueError, match=r"axis 3 is out of range.*\(2, 3, 4\)"):
        batch_norm(torch.randn(2, 3, 4), None, None, training=True, axis=3)


def test_functional_running_stats_must_come_together():
    with pytest.raises(ValueError, match="together"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="training=True"):
        batch_norm(torch.randn(4, 3), None, None, training=False)


# --------------------------------------------------------------------------- one value per channel


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)], ids=str)
def test_one_value_per_channel_in_training_names_remedies(shape):
    layer = bn.BatchNorm1d(3) if len(shape) == 2 else bn.BatchNorm2d(3)
    before = _snapshot(layer)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(shape))
    msg = str(info.value)
    assert "more than 1 value per channel" in msg
    assert "variance" in msg  # why: the batch variance of one value is 0
    for remedy in ("eval", "larger batch", "virtual batch", "GroupNorm"):
        assert remedy in msg, remedy
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)], ids=str)
def test_batch_of_one_in_eval_works(shape):
    layer = bn.BatchNorm1d(3) if len(shape) == 2 else bn.BatchNorm2d(3)
    with torch.no_grad():
        layer.running_mean.fill_(1.0)
        layer.running_var.fill_(4.0)
    layer.eval()
    x = torch.full(shape, 3.0)
    y = layer(x)
    assert y.shape == shape
    torch.testing.assert_close(y, torch.full(shape, 2.0 / (4.0 + 1e-5) ** 0.5))


def test_one_value_per_channel_is_fine_with_more_positions():
    # N=1 but H*W=4 values per channel: batch statistics exist
    y = bn.BatchNorm2d(3)(torch.randn(1, 3, 2, 2))
    assert y.shape == (1, 3, 2, 2)


# --------------------------------------------------------------------------- dtypes and settings


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_floating_input_raises_type_error(dtype):
    layer = bn.BatchNorm2d(3)
    before = _snapshot(layer)
    x = torch.ones(2, 3, 2, 2).to(dtype)
    with pytest.raises(TypeError, match=r"floating-point.*x\.float\(\)"):
        layer(x)
    _assert_unchanged(layer, before)
    with pytest.raises(TypeError, match=str(dtype)):
        batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_non_positive_eps_in_training(eps):
    layer = _moved(bn.BatchNorm2d(3))
    layer.eps = eps
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="eps must be positive"):
        layer(torch.randn(2, 3, 2, 2))
    _assert_unchanged(layer, before)
    with pytest.raises(ValueError, match="eps must be positive"):
        batch_norm(torch.randn(4, 3), None, None, training=True, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, -1.0])
def test_negative_momentum_raises(momentum):
    layer = _moved(bn.BatchNorm2d(3))
    layer.momentum = momentum
    before = _snapshot(layer)
    with pytest.raises(ValueError, match=r"momentum.*\[0, 1\]") as info:
        layer(torch.randn(2, 3, 2, 2))
    assert str(momentum) in str(info.value)
    _assert_unchanged(layer, before)
    with pytest.raises(ValueError, match="momentum"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=momentum)


def test_keras_style_momentum_is_refused_with_a_translation():
    with pytest.raises(ValueError, match=r"momentum=0\.01"):
        batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=1.5)


# --------------------------------------------------------------------------- non-finite batches


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
def test_non_finite_batch_never_reaches_running_stats(bad, momentum):
    layer = _moved(bn.BatchNorm2d(3, momentum=momentum))
    layer(torch.randn(4, 3, 3, 3))
    before = _snapshot(layer)
    assert int(before["num_batches_tracked"]) == 2
    x = torch.randn(4, 3, 3, 3)
    x[1, 0, 2, 2] = bad  # one value in one channel
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        layer(x)
    _assert_unchanged(layer, before)  # running_mean, running_var, num_batches_tracked, weight, bias

    # the next finite batch is counted as the third, with momentum=None's 1/3 weight
    y = torch.randn(4, 3, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(y)
    assert int(layer.num_batches_tracked) == 3
    f = 1 / 3 if momentum is None else momentum
    torch.testing.assert_close(
        layer.running_mean, (1 - f) * before["running_mean"] + f * y.mean((0, 2, 3)), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", ["auto", "composite", "torch"])
@pytest.mark.parametrize(
    "x_dtype,stats_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.float64), (torch.bfloat16, torch.float32)],
    ids=["f32", "f32-f64stats", "bf16-f32stats"],  # the first and last: the kernel updates them itself
)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])  # small float32 + grad: torch's kernel
def test_non_finite_batch_functional_leaves_stats(backend, x_dtype, stats_dtype, grad):
    rm, rv = torch.randn(3, dtype=stats_dtype), torch.rand(3, dtype=stats_dtype) + 0.5
    before = rm.clone(), rv.clone()
    x = torch.randn(5, 3).to(x_dtype)
    x[0, 2] = float("nan")
    x.requires_grad_(grad)
    with use_backend(backend), pytest.warns(RuntimeWarning, match="NaN or Inf"):
        y = batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    assert torch.isfinite(y[:, :2]).all()  # the clean channels are still normalised


def test_torch_itself_would_poison_the_stats():
    """Why the check above matters: torch writes the NaN into running_mean (pytorch#88474)."""
    layer = torch.nn.BatchNorm1d(3)
    x = torch.randn(5, 3)
    x[0, 2] = float("nan")
    layer(x)
    assert torch.isnan(layer.running_mean[2])


@pytest.fixture
def device_rule(monkeypatch) -> list:
    """CUDA's running-statistics rule, on the CPU: nothing read back during the step (the test a
    0-dim tensor, the update a select, the count a device add, momentum=None's factor a tensor); a
    kept-out batch is counted on the device and `_report_skips` warns, at once here (nothing to
    wait for). Returns what each step handed to num_batches_tracked's count."""
    from batchnorm import act, functional, modules

    for module in (functional, modules):
        monkeypatch.setattr(module, "_reads_back_later", lambda t: True)
    handed: list = []
    count = functional._count_batch

    def counting(tracked, counted) -> None:
        handed.append(counted)
        count(tracked, counted)

    for module in (modules, act):
        monkeypatch.setattr(module, "_count_batch", counting)
    return handed


def _ghost(C, **kw):
    return bn.BatchNorm2d(C, virtual_batch_size=2, **kw)


def _renorm(C, **kw):  # (the limits' schedule from the step count: a tensor on CUDA)
    return bn.BatchNorm2d(C, renorm=bn.Renorm(r_max=3.0, d_max=5.0, warmup_steps=1, r_max_steps=3, d_max_steps=3), **kw)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize(
    "backend,make",
    [
        ("composite", bn.BatchNorm2d),
        ("torch", bn.BatchNorm2d),
        ("triton", bn.BatchNorm2d),
        ("triton", bn.BatchNormAct2d),
        ("composite", _ghost),
        ("composite", _renorm),
        ("triton", _ghost),
        ("triton", _renorm),
    ],
    ids=["composite", "torch", "triton", "triton-act", "ghost", "renorm", "triton-ghost", "triton-renorm"],
)
def test_device_rule_keeps_a_bad_batch_out_without_reading_back(backend, make, momentum, device_rule, request):
    """The paths a CUDA tensor takes, under the rule above: the same buffers as torch's layer for
    the good batches (ghost batches and renorm update them from the whole batch's statistics too),
    nothing written or counted for the bad one, and its warning."""
    if backend == "triton":
        request.getfixturevalue("triton_calls")  # skips where the Triton kernels cannot run
    ours, theirs = make(3, momentum=momentum), torch.nn.BatchNorm2d(3, momentum=momentum)
    good = [torch.randn(4, 3, 5, 5) * 2 + 1 for _ in range(3)]
    bad = torch.randn(4, 3, 5, 5)
    bad[1, 0, 2, 2] = float("nan")
    with use_backend(backend):
        for x in good[:2]:
            ours(x), theirs(x)
        before = _snapshot(ours)
        with pytest.warns(RuntimeWarning, match="NaN or Inf.*reached the host"):
            ours(bad)
        _assert_unchanged(ours, before)
        ours(good[2]), theirs(good[2])
    assert all(isinstance(f, torch.Tensor) for f in device_rule)  # counted on the device, not read back
    assert [bool(f) for f in device_rule] == [True, True, False, True]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), msg=name)


def test_device_rule_on_torchs_kernel_updates_in_one_launch(device_rule, triton_calls, monkeypatch):
    """The "torch" backend on a CUDA device (torch's kernel, our running-statistics rule) updates
    the buffers from torch's invstd in one Triton launch (`update_running(..., eps=)`), not in
    about 25 small torch ops; the buffers as torch's layer's, and a bad batch kept out."""
    from batchnorm.kernels import triton_bn

    epsilons = []
    update = triton_bn.update_running

    def spy(*args, **kwargs):
        flag = update(*args, **kwargs)
        epsilons.append((kwargs.get("eps"), isinstance(flag, torch.Tensor)))
        return flag

    monkeypatch.setattr(triton_bn, "update_running", spy)
    ours, theirs = bn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x, bad = torch.randn(4, 3, 5, 5) * 2 + 1, torch.randn(4, 3, 5, 5)
    bad[0, 1, 0, 0] = float("inf")
    with use_backend("torch"):
        ours(x), theirs(x)
        with pytest.warns(RuntimeWarning, match="NaN or Inf"):
            ours(bad)
    assert epsilons == [(ours.eps, True)] * 2
    assert [bool(f) for f in device_rule] == [True, False]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), msg=name)


@pytest.mark.parametrize("make", [_ghost, _renorm], ids=["ghost", "renorm"])
def test_device_rule_updates_the_variants_in_one_launch(make, device_rule, triton_calls, monkeypatch):
    """The variants' update on a CUDA device (from the whole batch's unbiased variance) is one
    Triton launch (`update_running` with m=None) wherever the backend is not "composite"."""
    from batchnorm.kernels import triton_bn

    handed = []
    update = triton_bn.update_running

    def spy(mean, var, rm, rv, m, *args, **kwargs):
        flag = update(mean, var, rm, rv, m, *args, **kwargs)
        handed.append((m, isinstance(flag, torch.Tensor)))
        return flag

    monkeypatch.setattr(triton_bn, "update_running", spy)
    layer = make(3)
    with use_backend("triton"):
        layer(torch.randn(4, 3, 5, 5))
    with use_backend("composite"):
        layer(torch.randn(4, 3, 5, 5))
    assert handed == [(None, True)]
    assert [bool(f) for f in device_rule] == [True, True]


def test_kept_out_batches_are_reported_once_their_count_arrives(monkeypatch):
    """A CUDA device's count of kept-out batches (here a CPU tensor behind a fake device and
    events): copied to the host at most every SKIP_REPORT_S, read only once the copy's event has
    completed, and each batch reported once, with how many."""
    from batchnorm import functional

    made: list = []

    class Event:
        def __init__(self) -> None:
            self.done = False
            made.append(self)

        def record(self, stream) -> None:
            pass

        def query(self) -> bool:
            return self.done

    device = torch.device("cuda", 0)
    skips = functional._Skips.__new__(functional._Skips)
    skips.count, skips.host = torch.tensor(1), torch.tensor(0)  # the device has kept one batch out
    skips.copy, skips.due, skips.seen = None, 0.0, 0
    monkeypatch.setitem(functional._skips, device, skips)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional._report_skips(device)  # copies the count; its event has not completed
        functional._report_skips(device)  # still on its way: no warning, no second copy
    assert len(made) == 1
    made[0].done = True
    with pytest.warns(RuntimeWarning, match=r"NaN or Inf.*\(1 batch on cuda:0") as record:
        functional._report_skips(device)
    assert len(record) == 1 and skips.copy is None  # read; the next copy waits SKIP_REPORT_S
    skips.count += 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional._report_skips(device)  # not due yet: nothing copied, nothing reported
        assert len(made) == 1
        skips.due = 0.0
        functional._report_skips(device)  # due: the copy goes out
    assert len(made) == 2
    made[1].done = True
    with pytest.warns(RuntimeWarning, match=r"\(2 batches on cuda:0") as record:
        functional._report_skips(device)
    assert len(record) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize(
    "make", [bn.BatchNorm2d, bn.BatchNormAct2d, _ghost, _renorm], ids=["bn", "act", "ghost", "renorm"]
)
@pytest.mark.parametrize("backend", ["auto", "torch", "composite"])
def test_cuda_training_step_never_waits_for_the_gpu(backend, make, momentum, monkeypatch):
    """torch.cuda's sync debug mode raises on any host synchronisation: training steps (forward and
    backward), a non-finite batch and an eval call run under it; the warning comes after, once the
    count of kept-out batches is home (copied at every call here: SKIP_REPORT_S 0)."""
    from batchnorm import functional

    monkeypatch.setattr(functional, "SKIP_REPORT_S", 0.0)
    layer = make(8, momentum=momentum).cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)
    bad = x.detach().clone()
    bad[0, 0, 0, 0] = float("nan")
    with use_backend(backend):
        layer(x).sum().backward()  # the first call may compile kernels and allocate
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                layer(x).sum().backward()
            before = _snapshot(layer)
            layer(bad)
            with torch.no_grad():
                layer.eval()(x)
                layer.train()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        _assert_unchanged(layer, before)
        assert int(layer.num_batches_tracked) == 3
        with pytest.warns(RuntimeWarning, match="NaN or Inf"):  # by the second call at the latest
            layer(x)  # reads a copy made before the bad batch, if one was on its way; copies again
            torch.cuda.synchronize()
            layer(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_graph_of_a_training_forward_keeps_a_bad_batch_out(backend, monkeypatch):
    """A training forward captured in a CUDA graph (nothing is read back, so it can be): replays
    of good batches move the running statistics, a replay of a bad one leaves them and counts it
    on the device, which a later eager call reports."""
    from batchnorm import functional

    monkeypatch.setattr(functional, "SKIP_REPORT_S", 0.0)
    layer = bn.BatchNorm2d(8).cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda")
    with use_backend(backend), torch.no_grad():
        layer(x)  # compile the kernels and warm the allocator outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(x)
    x.copy_(torch.randn_like(x) * 3 + 1)
    before = _snapshot(layer)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(layer.running_mean, before["running_mean"])
    moved = _snapshot(layer)
    skips = functional._skips[x.device]
    skips.seen = int(skips.count)  # (batches other tests kept out: reported already, for this test)
    x[0, 0, 0, 0] = float("nan")
    graph.replay()
    torch.cuda.synchronize()
    _assert_unchanged(layer, moved)
    good = torch.randn_like(x)
    with use_backend(backend), torch.no_grad(), pytest.warns(RuntimeWarning, match=r"\(1 batch on cuda"):
        layer(good)  # reads a copy made before the replays, if one was on its way; copies again
        torch.cuda.synchronize()
        layer(good)


# --------------------------------------------------------------------------- nothing corrupted


@pytest.mark.parametrize(
    "make_input",
    [
        lambda: torch.randn(2, 4, 3, 3),  # wrong channels
        lambda: torch.randn(2, 3, 3),  # wrong rank
        lambda: torch.ones(2, 3, 3, 3, dtype=torch.long),  # wrong dtype
        lambda: torch.randn(1, 3, 1, 1),  # one value per channel
    ],
    ids=["channels", "rank", "dtype", "one-value"],
)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
def test_an_error_leaves_every_buffer_unchanged(make_input, momentum):
    layer = _moved(bn.BatchNorm2d(3, momentum=momentum))
    before = _snapshot(layer)
    with pytest.raises((ValueError, TypeError)):
        layer(make_input())
    _assert_unchanged(layer, before)
