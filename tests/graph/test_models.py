import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hookmix.graph.models import create_model, default_input_size, load_weights, resolve_model, set_num_classes


def test_resolve_names_and_prefixes():
    assert resolve_model("resnet50").id == "torchvision:resnet50"
    assert resolve_model("timm:resnet50").id == "timm:resnet50"
    assert resolve_model("vit_tiny_patch16_224").source == "timm"
    with pytest.raises(ValueError, match="closest names: .*convnext_tiny"):
        resolve_model("convnext_tiyn")
    with pytest.raises(ValueError, match="prefix"):
        resolve_model("keras:resnet50")


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = create_model("resnet18", seed=1), create_model("resnet18", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "name, attr", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"), ("timm:resnet18", "fc")]
)
def test_num_classes_replaces_the_classifier(name, attr):
    model = create_model(name, num_classes=7)
    assert model.get_submodule(attr).out_features == 7
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_weights_file_round_trip(tmp_path):
    model = create_model("resnet18", seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = create_model("resnet18", weights=tmp_path / name, seed=9)
        assert torch.equal(loaded.conv1.weight, model.conv1.weight)


class Smuggler:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickled_code_in_weights_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Smuggler()}))
    with pytest.raises(ValueError, match="cannot load weights"):
        load_weights(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.pt")


def test_default_input_size():
    assert default_input_size(create_model("timm:vit_tiny_patch16_224")) == (3, 224, 224)
    assert default_input_size(nn.Linear(2, 2)) == (3, 224, 224)
    with pytest.raises(ValueError, match="not both"):
        create_model("resnet18", pretrained=True, weights="x")
    set_num_classes(m := create_model("resnet18"), 2)
    assert m.fc.out_features == 2
