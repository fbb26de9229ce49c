"""A loaded fine-tuned model used on images: ``load_finetuned`` reads a run directory and an exported file alike,
``.transform`` is the model library's own evaluation preset, and ``.predict`` gives softmax / sigmoid of the
logits over T with the thresholds of each class — all checked against a torchvision or timm model built by
hand with the head's weights put back, on real photos (scikit-learn's, no download) prepared by
``weights.transforms()`` or timm's ``resolve_model_data_config`` + ``create_transform``: never against the code
under test.

Plausible maintainer bugs, and the test that catches each:

* mean and std swapped, or the channels' order reversed; resize and crop size swapped; another interpolation
  (bilinear for timm's bicubic) -> ``test_the_transform_is_the_model_library_s_preset`` (exact tensors, both
  libraries, non-square photos);
* T not applied, or applied twice (in ``probabilities`` and again in ``predict``)
  -> ``test_predict_is_softmax_of_the_logits_over_t`` (every row and class, T = 2.5);
* thresholds applied in another class order (reversed), one threshold for all, or argmax for a multi-label
  model -> ``test_multilabel_predict_applies_each_class_s_threshold`` (``>`` for ``>=`` at a threshold is
  ``tests/app/test_predict_export.py``'s);
* a run directory and the exported file of the same model rebuilt differently (e.g. the file's classifier left
  at another init) -> ``test_the_run_directory_and_the_exported_file_are_one_model``;
* a head taken with another run's ``run.json``, a run of another format version, a recorded transform that
  makes another input size than the model's, or a file that is neither -> one-line refusals naming the file in
  ``test_what_cannot_be_loaded_is_refused_in_one_line``;
* ``predict`` given one path (a string iterated character by character) or an unreadable file
  -> ``test_predict_refuses_what_it_cannot_classify``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import timm.data
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_sample_images
from torch import nn

from hookmix import FinetunedConfig, UsageError, load_finetuned, save_finetuned
from hookmix.headonly.preprocessing import read_eval_transform
from hookmix.headonly.run_directory import BackboneSource, save_run
from hookmix.headonly.trained_model import assemble

CLASSES = ("cat", "dog", "eel")
TOLERANCE = 2e-6  # float32 on CPU: predict and the by-hand model agree to 1.2e-7 (measured, both resnet18s)


def library_preset(name: str) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform as the model's own library builds it."""
    library, _, arch = name.partition(":")
    if library == "torchvision":
        return torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    return timm.data.create_transform(**timm.data.resolve_model_data_config(timm.create_model(arch)))


def by_hand(name: str, head_file: Path) -> nn.Module:
    """The architecture at seed 0 with a 3-class ``fc`` holding the trained head's weights, in eval mode."""
    library, _, arch = name.partition(":")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch) if library == "torchvision" else timm.create_model(arch)
    model.fc = nn.Linear(model.fc.in_features, len(CLASSES))
    head = load_file(head_file)
    model.fc.load_state_dict({"weight": head["fc.weight"], "bias": head["fc.bias"]})
    return model.eval()


def make_run(
    out: Path, name: str, *, temperature: float, thresholds: tuple[float, ...] | None = None, seed: int = 0
) -> Path:
    """A run directory written by the library (as ``hookmix finetune`` does): the model initialised from
    ``seed``, cut at layer4 with its own classifier as the head, scaled up so that T visibly changes the
    probabilities."""
    source = BackboneSource(name, seed=seed)
    model = source.build()
    source.resize(model, len(CLASSES))
    _, head, fixed = assemble(model, "layer4", "model", input_size=(3, 224, 224), num_classes=len(CLASSES))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.mul_(40)
    config = FinetunedConfig(
        model=name,
        weights=source.id,
        layer="layer4",
        head="model",
        pooled=bool(fixed),
        classes=CLASSES,
        task="multiclass" if thresholds is None else "multilabel",
        input_size=(3, 224, 224),
        preprocessing={"eval": read_eval_transform(library_preset(name), name).record()},
        temperature=temperature,
        thresholds=thresholds,
    )
    out.mkdir(parents=True)
    save_run(out, config, source, head, identity={})
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real photos as PNG files of other shapes than the crop: both 427x640 photos, a portrait and a small crop."""
    folder = tmp_path_factory.mktemp("photos")
    china, flower = (Image.fromarray(pixels) for pixels in load_sample_images().images)
    images = [china, flower, china.crop((100, 20, 300, 320)), flower.crop((300, 200, 390, 330))]
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module", params=["torchvision:resnet18", "timm:resnet18"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, make_run(tmp_path_factory.mktemp("run") / "run", request.param, temperature=2.5)


def test_the_transform_is_the_model_library_s_preset(run: tuple[str, Path], photos: list[Path]) -> None:
    """torchvision: shorter side 256 bilinear, crop 224; timm resnet18: shorter side 235 (224 / 0.95) bicubic,
    crop 224; both ImageNet mean/std: the loaded model's transform gives the preset's tensors exactly."""
    name, directory = run
    transform = load_finetuned(directory).transform
    preset = library_preset(name)
    for path in photos:
        image = Image.open(path).convert("RGB")
        assert torch.equal(transform(image), preset(image))


def test_predict_is_softmax_of_the_logits_over_t(run: tuple[str, Path], photos: list[Path]) -> None:
    """Every row and class of ``predict`` (files and PIL images, in batches of 3) is softmax(logits / 2.5) of the
    model built by hand on the preset's tensors; T visibly matters (> 0.05 between with and without)."""
    name, directory = run
    x = torch.stack([library_preset(name)(Image.open(p).convert("RGB")) for p in photos])
    with torch.no_grad():
        logits = by_hand(name, directory / "head.safetensors")(x)
    expected = torch.softmax(logits / 2.5, dim=1)
    assert (expected - torch.softmax(logits, dim=1)).abs().max() > 0.05
    model = load_finetuned(directory)
    found = model.predict(photos, batch_size=3)
    torch.testing.assert_close(found.probabilities, expected, rtol=0, atol=TOLERANCE)
    assert found.predicted == tuple((CLASSES[i],) for i in expected.argmax(dim=1).tolist())
    assert found.classes == CLASSES
    pil = model.predict([Image.open(p) for p in photos], batch_size=3)
    torch.testing.assert_close(pil.probabilities, found.probabilities, rtol=0, atol=0)


def test_multilabel_predict_applies_each_class_s_threshold(tmp_path: Path, photos: list[Path]) -> None:
    """Per class its own threshold, in class order, on sigmoid(logits / T) (T = 15 spreads the large logits):
    thresholds midway between the photos' probabilities, other for each class, so that the reversed order
    decides other label sets, and clear of every probability (> 1e-5) so that only the order decides."""
    name, temperature = "torchvision:resnet18", 15.0
    probe = make_run(tmp_path / "probe", name, temperature=temperature, thresholds=(0.5, 0.5, 0.5))
    x = torch.stack([library_preset(name)(Image.open(p).convert("RGB")) for p in photos])
    with torch.no_grad():
        probabilities = torch.sigmoid(by_hand(name, probe / "head.safetensors")(x) / temperature)
    ordered = probabilities.sort(dim=0).values
    thresholds = tuple((ordered[k, j].item() + ordered[k + 1, j].item()) / 2 for j, k in enumerate((0, 2, 1)))
    assert (probabilities - torch.tensor(thresholds)).abs().min() > 1e-5
    expected = probabilities >= torch.tensor(thresholds)
    assert not torch.equal(expected, probabilities >= torch.tensor(thresholds[::-1]))
    directory = make_run(tmp_path / "run", name, temperature=temperature, thresholds=thresholds)
    found = load_finetuned(directory).predict(photos)
    torch.testing.assert_close(found.probabilities, probabilities, rtol=0, atol=TOLERANCE)
    assert found.predicted == tuple(tuple(c for c, on in zip(CLASSES, row) if on) for row in expected.tolist())


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_the_run_directory_and_the_exported_file_are_one_model(name: str, photos: list[Path], tmp_path: Path) -> None:
    """The file save_finetuned writes from a loaded run (its whole source model and head) loads into the same
    model: equal config, equal probabilities; and ``run.json`` itself names its run. The backbone is initialised
    from seed 3, not the architecture's default seed 0, so that a file whose weights were not loaded differs."""
    from hookmix.headonly.trained_model import load_finetuned_with_source

    directory = make_run(tmp_path / "run", name, temperature=2.0, seed=3)
    model, source = load_finetuned_with_source(directory)
    exported = load_finetuned(save_finetuned(tmp_path / "m.safetensors", source, model.head, model.config))
    assert exported.config == model.config
    torch.testing.assert_close(exported.predict(photos).probabilities, model.predict(photos).probabilities)
    assert load_finetuned(directory / "run.json").config == model.config


def _edit_run(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((directory / "run.json").read_text())
    change(data)
    (directory / "run.json").write_text(json.dumps(data))


@pytest.mark.parametrize("case", ["other-head", "old-version", "other-crop", "missing", "not-a-model"])
def test_what_cannot_be_loaded_is_refused_in_one_line(case: str, tmp_path: Path) -> None:
    directory = make_run(tmp_path / "run", "torchvision:resnet18", temperature=1.0)
    target, expected = directory, ""
    if case == "other-head":
        other = make_run(tmp_path / "other", "torchvision:resnet18", temperature=2.0)
        shutil.copy(other / "head.safetensors", directory / "head.safetensors")
        expected = f"{directory / 'head.safetensors'} (run "
    elif case == "old-version":
        _edit_run(directory, lambda data: data.update(run_version=1))
        expected = f"{directory / 'run.json'} is run format 1; this hookmix reads 2"
    elif case == "other-crop":
        _edit_run(directory, lambda data: data["finetuned"]["preprocessing"]["eval"].update(crop=[200, 200]))
        expected = f"{directory / 'run.json'}: preprocessing makes (3, 200, 200) inputs"
    elif case == "missing":
        target, expected = tmp_path / "nowhere", "nowhere does not exist"
    else:
        target = tmp_path / "notes.txt"
        target.write_text("not a model")
        expected = f"{target} is not a readable safetensors file"
    with pytest.raises(UsageError) as error:
        load_finetuned(target)
    said = str(error.value)
    assert expected in said and "\n" not in said


def test_predict_refuses_what_it_cannot_classify(tmp_path: Path, photos: list[Path]) -> None:
    model = load_finetuned(make_run(tmp_path / "run", "torchvision:resnet18", temperature=1.0))
    with pytest.raises(UsageError, match="give a list of image paths or PIL images"):
        model.predict(str(photos[0]))
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(UsageError, match=f"image {broken} is not readable as RGB: not an image format PIL reads"):
        model.predict([photos[0], broken])
    assert model.predict([]).probabilities.shape == (0, len(CLASSES))
    bare = FinetunedConfig("torchvision:resnet18", "w", "layer4", "model", True, CLASSES, "multiclass", (3, 8, 8))
    with pytest.raises(UsageError, match="records no preprocessing"):
        type(model)(model.backbone, model.head, bare).transform
