"""convert, freeze/unfreeze and fold, each against an oracle (torch's BN, the unmodified model)."""

import pytest
import torch
from torch import nn

import bnlab


def _randomize_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, bnlab.nn.batchnorm._BatchNormBase)):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
    return model


def _torch_model():
    return nn.Sequential(
        nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.Flatten(2), nn.BatchNorm1d(4),
        nn.Unflatten(2, (1, 1, 1)), nn.Flatten(), nn.Linear(4, 6), nn.SyncBatchNorm(6), nn.ReLU(),
    )


def test_convert_to_bnlab_and_back_keeps_outputs():
    torch.manual_seed(0)
    ref = _randomize_bn(_torch_model())
    x = torch.randn(8, 2, 3, 3, 3)
    ref.eval()
    expected = ref(x)
    import copy

    ours = bnlab.convert(copy.deepcopy(ref), to="bnlab")
    kinds = [type(m) for m in ours.modules()]
    assert bnlab.nn.BatchNorm3d in kinds and bnlab.nn.BatchNorm1d in kinds and bnlab.nn.BatchNormNd in kinds
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ours.modules())
    torch.testing.assert_close(ours(x), expected)
    assert not ours.training
    ours.train(), ref.train()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)  # training mode too
    back = bnlab.convert(ours, to="torch")
    assert any(type(m) is nn.BatchNorm3d for m in back.modules())
    with pytest.raises(ValueError, match="to must be"):
        bnlab.convert(back, to="keras")


def test_freeze_and_unfreeze():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Linear(3, 5), bnlab.BatchNorm(num_features=5), nn.Conv1d(5, 4, 1), nn.BatchNorm1d(4)))
    model = nn.Sequential(model[0], model[1], nn.Unflatten(1, (5, 1)), model[2], model[3])
    x = torch.randn(6, 3)
    model.eval()
    expected = model(x)
    frozen = bnlab.freeze(model)
    assert sum(isinstance(m, bnlab.nn.FrozenBatchNorm) for m in frozen.modules()) == 2
    frozen.train()  # frozen layers use their statistics even in train mode
    torch.testing.assert_close(frozen(x), expected)
    bn_params = [p for m in frozen.modules() if isinstance(m, bnlab.nn.FrozenBatchNorm) for p in m.parameters(recurse=False)]
    assert bn_params == []
    s = bnlab.summary(frozen, (3,), print_fn=None)
    assert s.non_trainable == 5 * 4 + 4 * 4  # gamma, beta, mean, var of both layers
    back = bnlab.unfreeze(frozen)
    assert isinstance(back[1], bnlab.BatchNorm) and type(back[4]) is nn.BatchNorm1d
    back.eval()
    torch.testing.assert_close(back(x), expected)
    assert back[1].gamma.requires_grad


FOLD_CASES = {
    "linear": lambda: (nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)), (5, 6)),
    "linear-nobias-bnlab": lambda: (nn.Sequential(nn.Linear(6, 8, bias=False), bnlab.BatchNorm(num_features=8)), (5, 6)),
    "linear-bn-noaffine": lambda: (nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False)), (5, 6)),
    "conv1d": lambda: (nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (2, 3, 9)),
    "conv2d-nobias": lambda: (nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bnlab.BatchNorm(axis=1, num_features=4)), (2, 3, 7, 7)),
    "conv3d": lambda: (nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (2, 2, 5, 5, 5)),
    "grouped": lambda: (nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 6, 6)),
    "depthwise": lambda: (nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4, affine=False)), (2, 4, 6, 6)),
}


@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_fold_gives_the_same_outputs(case):
    torch.manual_seed(0)
    model, shape = FOLD_CASES[case]()
    model = _randomize_bn(model).eval()
    x = torch.randn(shape)
    folded, report = bnlab.fold(model, return_report=True)
    assert len(report.folded) == 1 and report.left == []
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, bnlab.nn.batchnorm._BatchNormBase)) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, (nn.modules.batchnorm._BatchNorm, bnlab.nn.batchnorm._BatchNormBase)) for m in model.modules())  # input untouched


def test_fold_returns_the_model_as_pytorchs_fuse_helpers_do():
    """``model = bnlab.fold(model)`` gives a module (not a tuple); the report comes with ``return_report=True``."""
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    folded = bnlab.fold(model)
    assert isinstance(folded, nn.Sequential) and isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    again, report = bnlab.fold(model, return_report=True)
    assert isinstance(again, nn.Sequential) and report.folded == [("0", "1")] and report.left == []
    model = bnlab.fold(model)  # the habit: rebinding the name keeps a model
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_frozen_batch_norm_is_exported_at_the_top_level():
    assert bnlab.FrozenBatchNorm is bnlab.nn.FrozenBatchNorm and "FrozenBatchNorm" in bnlab.__all__
    frozen = bnlab.freeze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert isinstance(frozen[1], bnlab.FrozenBatchNorm)


class ResBlock(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), bnlab.BatchNorm(axis=1, num_features=c)
        self.bn_out = nn.BatchNorm2d(c)  # after the residual sum: nothing to fold into

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.bn_out(torch.relu(self.bn2(self.conv2(y)) + x))


def test_fold_resnet_block_through_fx_and_reports_what_stays():
    torch.manual_seed(0)
    block = _randomize_bn(ResBlock()).eval()
    x = torch.randn(2, 4, 8, 8)
    folded, report = bnlab.fold(block, return_report=True)
    assert sorted(report.folded) == [("conv1", "bn1"), ("conv2", "bn2")]
    assert [name for name, _ in report.left] == ["bn_out"]
    torch.testing.assert_close(folded(x), block(x), rtol=1e-5, atol=1e-5)


def test_fold_refuses_training_mode_and_skips_unsuitable_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="eval mode"):
        bnlab.fold(model)
    odd = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    folded, report = bnlab.fold(odd, return_report=True)
    reasons = dict(report.left)
    assert "2" in reasons and "4" in reasons and "track_running_stats" in reasons["4"]
    x = torch.randn(5, 3)
    torch.testing.assert_close(folded(x), odd(x))


def _kmnist_cnn():
    from bnlab.lab import models

    torch.manual_seed(0)
    return _randomize_bn(models.build("kmnist_cnn", norm_layer="bnlab")).eval()


def test_fold_into_the_next_layer_removes_every_bn_of_the_tutorial_cnn():
    # Tutorial 003 puts BN after ReLU and pooling: each BN folds into the conv/dense after it
    # (through max pooling, a second BN and a Flatten).
    model = _kmnist_cnn()
    x = torch.randn(8, 1, 28, 28)
    folded, report = bnlab.fold(model, return_report=True)
    assert report.left == []
    assert sorted(report.folded) == [("11", "7"), ("11", "9"), ("14", "13"), ("5", "2"), ("5", "4")]
    assert not any(isinstance(m, bnlab.BatchNorm) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert any(isinstance(m, bnlab.BatchNorm) for m in model.modules())  # the original is untouched


def test_fold_forward_refuses_what_would_change_the_outputs():
    model = _kmnist_cnn()
    with torch.no_grad():
        model[2].gamma[3] = -0.7  # a negative scale before max pooling: max would become min
    folded, report = bnlab.fold(model, return_report=True)
    reasons = dict(report.left)
    assert list(reasons) == ["2"] and "max pooling" in reasons["2"]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)

    padded = _randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))).eval()
    _, report = bnlab.fold(padded, return_report=True)
    assert "zero-padded" in dict(report.left)["1"]
    ambiguous = _randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3), nn.Linear(3, 2))).eval()
    _, report = bnlab.fold(ambiguous, return_report=True)
    assert "axis" in dict(report.left)["1"]
    override = _randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.AvgPool2d(2, divisor_override=3), nn.Conv2d(3, 2, 1))).eval()
    _, report = bnlab.fold(override, return_report=True)
    assert "divisor override" in dict(report.left)["1"]
    branching = _randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))).eval()
    _, report = bnlab.fold(branching, return_report=True)
    assert dict(report.left)["1"]


@pytest.mark.parametrize("case", ["grouped-conv", "avgpool-conv1d", "bn-bn-linear", "dropout-linear-no-bias", "reflect-padded-conv"])
def test_fold_forward_cases_give_the_same_outputs(case):
    torch.manual_seed(0)
    if case == "grouped-conv":
        model, x = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, groups=2)), torch.randn(2, 6, 7, 7)
    elif case == "avgpool-conv1d":
        model, x = nn.Sequential(nn.ReLU(), bnlab.BatchNorm(axis=1, num_features=4), nn.AvgPool1d(2), nn.Conv1d(4, 3, 2)), torch.randn(2, 4, 10)
    elif case == "bn-bn-linear":
        model = nn.Sequential(nn.Tanh(), bnlab.BatchNorm(num_features=5), bnlab.BatchNorm(num_features=5, epsilon=1e-2), nn.Linear(5, 3))
        x = torch.randn(6, 5)
    elif case == "reflect-padded-conv":
        model, x = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), torch.randn(2, 3, 6, 6)
    else:
        model = nn.Sequential(nn.Sigmoid(), bnlab.BatchNorm(num_features=5), nn.Dropout(0.3), nn.Linear(5, 3, bias=False))
        x = torch.randn(6, 5)
    model = _randomize_bn(model).eval()
    folded, report = bnlab.fold(model, return_report=True)
    assert report.left == [] and report.folded
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


def test_fold_forward_through_a_shared_pool_but_not_into_a_shared_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2)  # one stateless module used twice
            self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.conv1, self.conv2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            x = self.conv1(self.pool(self.bn1(torch.relu(x))))
            return self.conv2(self.pool(self.bn2(torch.relu(x))))

    net = _randomize_bn(Net()).eval()
    folded, report = bnlab.fold(net, return_report=True)
    assert sorted(report.folded) == [("conv1", "bn1"), ("conv2", "bn2")] and report.left == []
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-6)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.lin = bnlab.BatchNorm(num_features=4), nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.bn(torch.tanh(x))) + self.lin(x)

    shared = _randomize_bn(Shared()).eval()
    folded, report = bnlab.fold(shared, return_report=True)
    assert "called more than once" in dict(report.left)["bn"]
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), shared(x))
