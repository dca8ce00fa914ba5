"""The model registry against torchvision's own ResNeXts and the paper's parameter counts."""

import pytest
import torch
import torchvision

from fastpretrain.errors import UserError
from fastpretrain.models import count_parameters, create_model, list_models

# Mahajan et al. 2018, Table 1 (ImageNet-1k head): millions of parameters.
PAPER_PARAMS_M = {"resnext101_32x8d": 88, "resnext101_32x16d": 193, "resnext101_32x32d": 466, "resnext101_32x48d": 829}


@pytest.mark.parametrize("arch", list_models())
def test_every_registered_model_builds_with_its_head(arch):
    with torch.device("meta"):  # no memory for the 829M-parameter trunk
        model = create_model(arch, 17000)
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.out_features == 17000
    assert all(m.groups == 32 for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)


@pytest.mark.parametrize("arch", ["resnext50_32x4d", "resnext101_32x8d"])
def test_matches_torchvision_resnext(arch):
    with torch.device("meta"):
        ours, theirs = create_model(arch, 1000), getattr(torchvision.models, arch)()
    assert count_parameters(ours) == count_parameters(theirs)
    assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in theirs.parameters()]


@pytest.mark.parametrize("arch", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_the_paper(arch):
    with torch.device("meta"):
        millions = count_parameters(create_model(arch, 1000)) / 1e6
    assert millions == pytest.approx(PAPER_PARAMS_M[arch], rel=0.01)


def test_tiny_model_runs_channels_last_forward_and_backward():
    model = create_model("resnext_tiny", 7).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_arch_is_a_user_error_listing_the_known_ones():
    with pytest.raises(UserError, match="resnext101_32x48d"):
        create_model("resnet9000", 10)
