"""Tests for models/: shapes on every supported geometry, normalisation, determinism, parameter counts."""
import pytest
import torch
from torch import nn

from models import ARCHITECTURES, Normalize, build_model, count_parameters
from models.small_cnn import feature_size
from models.wideresnet import WideResNet

# (in_channels, image_size, num_classes) of the datasets the project supports.
GEOMETRIES = {
    "mnist": (1, 28, 10),          # also fashion-mnist
    "cifar10": (3, 32, 10),        # also svhn
    "cifar100": (3, 32, 100),
    "tiny-imagenet": (3, 64, 200),
}

# Narrow variants keep the bulk of the tests fast on a CPU.
SMALL = dict(width=8, depth=34, widen_factor=1)


def stats(channels):
    """CIFAR-10 mean/std for RGB, MNIST mean/std for greyscale."""
    if channels == 3:
        return [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    return [0.1307], [0.3081]


def make(arch, geometry, **overrides):
    channels, size, classes = GEOMETRIES[geometry]
    mean, std = stats(channels)
    return build_model(arch, classes, channels, size, mean, std, **{**SMALL, **overrides})


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_output_shape_and_finite(arch, geometry):
    torch.manual_seed(0)
    channels, size, classes = GEOMETRIES[geometry]
    model = make(arch, geometry).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_input_gradient_flows(arch):
    # Attacks differentiate the loss with respect to the [0, 1] input, through the Normalize layer.
    torch.manual_seed(0)
    model = make(arch, "cifar10").train()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_normalize_is_first_layer_with_given_stats(arch):
    model = make(arch, "cifar10")
    mean, std = stats(3)
    first_name, first = next(iter(model.named_children()))
    assert first_name == "normalize" and isinstance(first, Normalize)
    assert model.normalize is first and not isinstance(model.net, Normalize)
    assert first.mean.shape == first.std.shape == (1, 3, 1, 1)
    assert torch.allclose(first.mean.flatten(), torch.tensor(mean))
    assert torch.allclose(first.std.flatten(), torch.tensor(std))
    # Buffers, not trainable parameters, but saved with the model.
    assert "normalize.mean" in model.state_dict() and "normalize.std" in model.state_dict()
    assert not any(name.startswith("normalize.") for name, _ in model.named_parameters())


def test_normalize_computes_standard_score():
    norm = Normalize([0.5, 0.25], [0.5, 0.125])
    x = torch.rand(4, 2, 5, 5)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 0.125], dim=1)
    assert torch.allclose(norm(x), expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eval_mode_is_deterministic(arch):
    torch.manual_seed(0)
    model = make(arch, "cifar10").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_unknown_architecture_is_rejected():
    with pytest.raises(ValueError, match="unknown architecture 'resnet-9000'; choose one of: resnet18"):
        build_model("resnet-9000", 10, 3, 32, [0.5] * 3, [0.5] * 3)


def test_mean_std_must_match_channels():
    with pytest.raises(ValueError, match="one per input channel"):
        build_model("resnet18", 10, 3, 32, [0.5], [0.5])


@pytest.mark.parametrize("depth", [8, 33, 35])
def test_wideresnet_rejects_invalid_depth(depth):
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        WideResNet(depth, 1)


def test_small_cnn_rejects_tiny_images():
    with pytest.raises(ValueError, match="at least 12x12"):
        build_model("small-cnn", 10, 1, 8, [0.5], [0.5])


@pytest.mark.parametrize("size, side", [(28, 4), (32, 5), (64, 13)])
def test_small_cnn_feature_size(size, side):
    assert feature_size(size) == side
    model = build_model("small-cnn", 10, 1, size, [0.5], [0.5])
    assert model.net.classifier.fc1.in_features == 64 * side * side


def test_resnet_width_sets_stage_channels():
    model = make("resnet18", "cifar10", width=8)
    assert model.net.conv1.out_channels == 8
    assert model.net.linear.in_features == 64


def test_full_size_parameter_counts():
    # Reference counts for CIFAR-10 (3x32x32, 10 classes) at full width.
    expected = {
        "resnet18": 11_173_962,
        "resnet34": 21_282_122,
        "wrn-34-10": 46_160_474,
        "vgg19": 20_040_522,
    }
    for arch, count in expected.items():
        model = make(arch, "cifar10", width=64, widen_factor=10)
        assert count_parameters(model) == count, arch
        assert count_parameters(model) == count_parameters(model.net)  # Normalize adds no parameters
    # SmallCNN on MNIST as in TRADES: 312,202 parameters.
    assert count_parameters(make("small-cnn", "mnist")) == 312_202


def test_resnet20_and_resnet32_are_he_et_als_cifar_networks():
    # He et al. 2016, section 4.2: 6n + 2 weighted layers in three stages of 16 / 32 / 64 channels. With zero-padding
    # shortcuts ResNet-20 has 269 722 parameters and ResNet-32 464 154 (the paper's 0.27M and 0.46M); the two 1x1
    # conv-BN projections add 16*32 + 2*32 + 32*64 + 2*64 = 2 752.
    for arch, n, paper_count in (("resnet20", 3, 269_722), ("resnet32", 5, 464_154)):
        model = make(arch, "cifar10", width=16)
        assert count_parameters(model) == paper_count + 2_752, arch
        convs = [m for m in model.net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) + 1 == 6 * n + 2, arch  # the 3x3 convolutions and the final linear layer
        assert [len(getattr(model.net, f"layer{i}")) for i in (1, 2, 3)] == [n, n, n] and not hasattr(model.net, "layer4")
        assert [getattr(model.net, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [16, 32, 64]
        assert model.net.linear.in_features == 64
    # ResNet-18 keeps its four stages and pytorch-cifar's state_dict keys
    keys = make("resnet18", "cifar10", width=8).state_dict().keys()
    assert "net.layer4.1.bn2.running_var" in keys and "net.linear.weight" in keys


def test_width_defaults_to_the_papers_per_architecture():
    import train_standard
    parse = lambda *flags: train_standard.resolve_dataset_defaults(  # noqa: E731
        train_standard.build_parser().parse_args(["--dataset", "cifar10", *flags]))
    assert parse("--arch", "resnet20").width == 16 and parse("--arch", "resnet32").width == 16
    assert parse("--arch", "resnet18").width == 64 and parse().width == 64
    assert parse("--arch", "resnet20", "--width", "32").width == 32


def test_full_size_forward():
    torch.manual_seed(0)
    for arch in ("resnet18", "wrn-34-10"):
        model = make(arch, "cifar10", width=64).eval()
        with torch.no_grad():
            logits = model(torch.rand(2, 3, 32, 32))
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
