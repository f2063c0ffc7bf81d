"""Model tools: population statistics, folding, conversion, freezing, diagnosis."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm.tools.fold import fold_weights


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


# --------------------------------------------------------------------------- population statistics


def _shifted_batches():
    """Batches whose means differ a lot: averaging per-batch variances is then far off."""
    g = torch.Generator().manual_seed(1)
    sizes, shifts = (7, 13, 2, 30, 5), (-6.0, 0.0, 9.0, 3.0, -2.0)
    return [torch.randn(n, 4, generator=g) * 0.5 + s for n, s in zip(sizes, shifts)]


@pytest.mark.parametrize("layer_cls", [nn.BatchNorm1d, bn.BatchNorm1d])
def test_population_statistics_are_exact(layer_cls):
    batches = _shifted_batches()
    model = nn.Sequential(layer_cls(4), nn.Linear(4, 2)).eval()
    model[0].momentum = 0.3
    before_nbt = model[0].num_batches_tracked.clone()
    stats = bn.population_statistics(model, batches, progress=False)
    x = torch.cat(batches).double()
    torch.testing.assert_close(model[0].running_mean.double(), x.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(model[0].running_var.double(), x.var(0), rtol=1e-6, atol=1e-6)
    assert stats["0"].count[0] == len(x)
    # the model is left as found
    assert not model[0].training and model[0].momentum == 0.3
    assert torch.equal(model[0].num_batches_tracked, before_nbt)

    # the shortcut of update_bn / PreciseBN (average of batch variances) misses the spread of batch means
    averaged = torch.stack([b.var(0, unbiased=False) for b in batches]).mean(0)
    assert bool((averaged.double() < 0.5 * x.var(0)).all())


def test_population_statistics_feeds_tuples_dicts_and_custom_forward():
    batches = _shifted_batches()
    ref = nn.Sequential(bn.BatchNorm1d(4))
    bn.population_statistics(ref, batches, progress=False)
    for loader, fwd in (
        ([(b, torch.zeros(len(b))) for b in batches], None),
        ([{"input": b} for b in batches], lambda m, item: m(item["input"])),
    ):
        model = nn.Sequential(bn.BatchNorm1d(4))
        bn.population_statistics(model, loader, progress=False, forward=fwd)
        torch.testing.assert_close(model[0].running_var, ref[0].running_var)


def test_population_statistics_deep_model_and_max_batches():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv3d(4, 2, 1) if False else nn.Identity()
    )
    data = [torch.randn(3, 3, 6, 6) for _ in range(5)]
    # with max_batches=2 only the first two batches count
    bn.population_statistics(model, data, max_batches=2, progress=False)
    with torch.no_grad():
        h = torch.cat([model[0](d) for d in data[:2]])
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, h.var((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_population_statistics_errors():
    with pytest.raises(ValueError, match="empty loader"):
        bn.population_statistics(nn.Sequential(bn.BatchNorm1d(3)), [], progress=False)
    with pytest.raises(ValueError, match="no BN layer"):
        bn.population_statistics(nn.Linear(3, 3), [torch.randn(2, 3)], progress=False)
    with pytest.raises(TypeError, match="forward="):
        bn.population_statistics(nn.Sequential(bn.BatchNorm1d(3)), ["text"], progress=False)


# --------------------------------------------------------------------------- folding


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = bn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b2 = nn.BatchNorm2d(8)
        self.t = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=4)
        self.b3 = nn.BatchNorm2d(8)
        self.b4 = bn.BatchNorm2d(8)
        self.c4 = nn.Conv2d(8, 4, 1)
        self.pool_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y)) + x
        y = self.b3(self.t(y))
        y = self.c4(self.b4(torch.relu(y)))
        return torch.relu(self.pool_bn(torch.nn.functional.max_pool2d(y, 2)))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Conv1d(3, 6, 3), bn.BatchNorm1d(6), nn.ReLU(), bn.BatchNorm1d(6), nn.Conv1d(6, 2, 1)
        )

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace this
            return x
        return self.seq(x)


@pytest.mark.parametrize(
    "make, shape",
    [
        (_Residual, (2, 8, 6, 6)),
        (
            lambda: nn.Sequential(
                nn.Linear(5, 6), bn.BatchNorm1d(6), nn.ReLU(), bn.BatchNorm1d(6), nn.Linear(6, 3)
            ),
            (4, 5),
        ),
        (lambda: nn.Sequential(nn.ConvTranspose3d(4, 6, 2, groups=2), nn.BatchNorm3d(6)), (2, 4, 3, 3, 3)),
        (
            lambda: nn.Sequential(nn.ConvTranspose1d(4, 6, 3, groups=2, bias=False), bn.BatchNorm1d(6)),
            (2, 4, 5),
        ),
        (_Untraceable, (2, 3, 7)),
    ],
)
def test_fold_keeps_outputs(make, shape):
    torch.manual_seed(0)
    model = _randomize_bn(make()).eval()
    before = copy.deepcopy(model.state_dict())
    folded = bn.fold_batchnorm(model)
    x = torch.randn(shape)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    report = folded.fold_report
    assert len(report.folded) == n_bn - left and len(report.kept) == left


def test_fold_report_names_what_was_kept():
    model = _randomize_bn(_Residual()).eval()
    report = bn.fold_batchnorm(model).fold_report
    assert report.method == "torch.fx"
    kept = dict(report.kept)
    assert set(kept) == {"pool_bn"}  # after max-pool and before relu: nothing to fold into
    assert "not a convolution or linear" in kept["pool_bn"] or "not a module" in kept["pool_bn"]
    assert ("b3", "t") in report.folded  # grouped transposed convolution


def test_fold_untraceable_uses_module_walk():
    report = bn.fold_batchnorm(_randomize_bn(_Untraceable()).eval()).fold_report
    assert report.method.startswith("module walk")
    assert len(report.folded) == 2


def test_grouped_transposed_fold_weights_match_torch_semantics():
    """Grouped ConvTranspose then BN equals the folded layer (torch's fuser scales the wrong axis)."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    norm = _randomize_bn(nn.BatchNorm2d(6).double()).eval()
    s = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    t = norm.bias - norm.running_mean * s
    w, b = fold_weights(conv.weight, conv.bias, s.detach(), t.detach(), transposed=True, groups=2)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expect = norm(conv(x))
    got = nn.functional.conv_transpose2d(x, w, b, groups=2)
    torch.testing.assert_close(got, expect)


def test_fold_refuses_training_mode():
    with pytest.raises(ValueError, match=r"eval mode.*model.eval\(\)"):
        bn.fold_batchnorm(nn.Sequential(nn.Linear(3, 3), bn.BatchNorm1d(3)))


# --------------------------------------------------------------------------- conversion and freezing


def _mixed_model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 9, 6), nn.BatchNorm1d(6)),
    )


def test_convert_round_trip_is_exact():
    torch.manual_seed(0)
    model = _randomize_bn(_mixed_model())
    model[1].weight.requires_grad_(False)
    model[2].train(False)
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.randn(2, 3, 5, 5)
    ref = copy.deepcopy(model)(x)
    ours = bn.convert_batchnorm(model, to="batchnorm")
    assert type(ours[1]) is bn.BatchNorm2d and type(ours[2][2]) is bn.BatchNorm1d
    for k, v in ours.state_dict(keep_vars=True).items():
        assert v is tensors[k]  # the very same tensors
    assert not ours[1].weight.requires_grad and not ours[2].training and ours[1].training
    torch.testing.assert_close(copy.deepcopy(ours)(x), ref)
    back = bn.convert_batchnorm(ours, to="torch")
    assert type(back[1]) is nn.BatchNorm2d and type(back[2][2]) is nn.BatchNorm1d
    assert "frozen" not in back[1].__dict__
    torch.testing.assert_close(back(x), ref)


def test_convert_errors():
    with pytest.raises(ValueError, match="'batchnorm' or 'torch'"):
        bn.convert_batchnorm(nn.Linear(2, 2), to="keras")
    with pytest.raises(ValueError, match="no torch counterpart"):
        bn.convert_batchnorm(nn.Sequential(bn.BatchNorm(3, axis=-1)), to="torch")


def test_freeze_matches_torchvision_formula_and_never_updates():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.BatchNorm2d(4))).train()
    frozen = bn.freeze_batchnorm(model, train_affine=False)
    layer = frozen[0]
    assert layer.frozen and not layer.weight.requires_grad and "frozen=True" in repr(layer)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 4, 5, 5)
    y = frozen(x)
    scale = layer.weight * (layer.running_var + layer.eps).rsqrt()
    shift = layer.bias - layer.running_mean * scale
    torch.testing.assert_close(y, x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    bn.unfreeze_batchnorm(frozen)
    frozen(x)
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_freeze_with_trainable_affine_gets_gradients():
    layer = bn.freeze_batchnorm(bn.BatchNorm(3, axis=-1), train_affine=True)
    x = torch.randn(2, 5, 3, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    with pytest.raises(ValueError, match="no running statistics"):
        bn.freeze_batchnorm(nn.BatchNorm1d(3, track_running_stats=False))


# --------------------------------------------------------------------------- diagnosis


def test_diagnose_flags_what_it_should():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=0.99), nn.ReLU(), bn.BatchNorm1d(8), nn.Linear(8, 2)
    )
    data = [torch.randn(16, 5) * 2 + 1 for _ in range(4)]
    model.train()
    model(data[0])
    model[3].num_batches_tracked.zero_()
    model[3].running_mean.zero_()
    model[3].running_var.fill_(1.0)
    with torch.no_grad():
        model[1].weight[:2] = 0.0
    model.eval()
    state = copy.deepcopy(model.state_dict())
    report = bn.diagnose(model, data, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert not model.training
    by = {d.name: d for d in report.layers}
    assert any("Keras/Flax" in i for i in by["1"].issues)
    assert any("2 channel(s) with |gamma|" in i for i in by["1"].issues)
    assert any("never moved" in i for i in by["3"].issues)
    assert by["3"].train_eval_gap > 0.1 and by["3"].var_error is not None
    data_dict = report.to_dict()
    assert data_dict["batches"] == 4 and len(data_dict["layers"]) == 2
    assert "BatchNorm diagnosis" in str(report)

    # after exact population statistics the statistics errors vanish
    bn.population_statistics(model, data, progress=False)
    again = {d.name: d for d in bn.diagnose(model, data, progress=False).layers}
    assert again["1"].mean_error < 1e-4 and again["3"].var_error < 1e-4
