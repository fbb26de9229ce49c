import pytest
import torch
import torchvision

from hookmix.graph.layers import format_layers, list_layers, resolve_layers


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(num_classes=3)


def test_exact_names_and_pseudo_layers(resnet):
    assert resolve_layers(resnet, "layer4") == ["layer4"]
    assert resolve_layers(resnet, ["input", "layer3.1", "output"]) == ["input", "layer3.1", "output"]


def test_globs_stay_inside_one_dotted_part(resnet):
    assert resolve_layers(resnet, "layer*") == ["layer1", "layer2", "layer3", "layer4"]
    assert resolve_layers(resnet, "layer4.*") == ["layer4.0", "layer4.1"]
    assert "layer4.0.conv1" in resolve_layers(resnet, "layer4.**")


def test_duplicates_removed_keeping_order(resnet):
    assert resolve_layers(resnet, ["layer2", "layer*", "layer2"]) == ["layer2", "layer1", "layer3", "layer4"]


def test_unknown_name_lists_close_matches(resnet):
    with pytest.raises(ValueError, match=r"layers='layr4'.*closest names: layer4"):
        resolve_layers(resnet, "layr4")


def test_empty_glob_and_empty_list(resnet):
    with pytest.raises(ValueError, match="matches no layer"):
        resolve_layers(resnet, "block*")
    with pytest.raises(ValueError, match="empty"):
        resolve_layers(resnet, [])
    with pytest.raises(TypeError, match="layers"):
        resolve_layers(resnet, 4)


def test_list_layers_shapes_params_and_mode_restored(resnet):
    resnet.train()
    bn_mean = resnet.bn1.running_mean.clone()
    rows = {r.name: r for r in list_layers(resnet, torch.randn(2, 3, 64, 64))}
    assert resnet.training and torch.equal(resnet.bn1.running_mean, bn_mean)
    assert rows["layer4"].output_shape == (2, 512, 2, 2)
    assert rows["layer4"].params == sum(p.numel() for p in resnet.layer4.parameters())
    assert rows["output"].output_shape == (2, 3) and rows["output"].type == "ResNet"
    assert rows["layer4.0.conv1"].depth == 3 and rows["fc"].calls == 1
    table = format_layers(list(rows.values()), max_depth=1)
    assert "layer4" in table and "2x512x2x2" in table and "layer4.0" not in table


def test_stages_resolve_to_the_stage_outputs(resnet):
    assert resolve_layers(resnet, "stages") == ["layer1", "layer2", "layer3", "layer4"]


def test_rows_mark_cut_points(resnet):
    rows = {r.name: r for r in list_layers(resnet, torch.randn(1, 3, 32, 32))}
    assert rows["output"].cut_point and rows["layer4"].cut_point and rows["layer4.0"].cut_point
    assert rows["layer4.0.conv2"].cut_point is False and rows["layer4.0.relu"].cut_point is False
    lines = format_layers([rows["layer4.0"], rows["layer4.0.conv2"]]).splitlines()
    assert lines[0].split() == ["name", "type", "output", "shape", "params", "cut", "mixup", "here"]
    assert lines[2].split()[-1] == "yes" and lines[3].split()[-1] == "no"


def test_an_input_the_model_refuses_and_a_depth_below_one_are_usage_errors(resnet):
    from hookmix import UsageError

    resnet.train()
    with pytest.raises(UsageError, match=r"example_input of shape 1x1x32x32: the model's forward refused it") as info:
        list_layers(resnet, torch.randn(1, 1, 32, 32))  # one channel for a 3-channel conv
    assert isinstance(info.value.__cause__, RuntimeError) and resnet.training  # the mode is restored
    assert not resnet.conv1._forward_hooks  # and the recording hooks removed
    rows = list_layers(resnet, torch.randn(1, 3, 32, 32))
    for depth in (0, -1, 1.5):
        with pytest.raises(UsageError, match=rf"max_depth={depth!r} must be an int >= 1"):
            format_layers(rows, max_depth=depth)
