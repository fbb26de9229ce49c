"""``hookmix sweep`` extracts every layer's cache in ONE backbone pass (per part: train, validation), into the
directories ``finetune --layer`` uses, with the bytes ``finetune`` writes, and its cells stay ``finetune``'s runs.

The passes are counted from the outside: a global forward pre-hook counts the rows that reach the model's stem
convolution (the only ``Conv2d`` with 3 input channels), leaving out the one-row probes that check the input size
and shapes.

Bugs a maintainer could plausibly make here, and the test that catches each:
- a backbone pass per layer again (or per layer and part), or the stored layers extracted again:
  ``test_one_pass_for_all_layers_into_the_caches_finetune_uses`` (stem rows = one pass; 0 on a second sweep);
- a layer's cache written under another directory or key than ``finetune --layer`` uses (so neither reuses the
  other's), or with other bytes (another cached point, dtype or rounding): the same test (directory names and
  shard bytes against a fresh ``finetune``; ``finetune`` reports reusing the sweep's caches and adds none);
- the cells drifting from ``finetune`` once the caches come from the shared pass (a layer trained on another
  layer's cache): the same test (final metrics of both layers' cells against ``finetune``, ≤ 1e-4);
- more than one progress bar per pass, or one that does not name the layers: the same test (stderr).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from hookmix.app.cli import main
from tests.conftest import write_folder

TOLERANCE = 1e-4  # as tests/headonly/test_sweep.py: cells against finetune runs
SMALL = ["--model", "resnet18", "--input-size", "3", "32", "32", "--epochs", "1"]


class StemRows:
    """Rows through the model's stem (a ``Conv2d`` with 3 input channels) in batches of more than one row."""

    def __init__(self) -> None:
        self.rows = 0
        self.handle = nn.modules.module.register_module_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple) -> None:
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and args[0].shape[0] > 1:
            self.rows += args[0].shape[0]

    def take(self) -> int:
        rows, self.rows = self.rows, 0
        return rows


@pytest.fixture
def stem_rows():
    counter = StemRows()
    yield counter
    counter.handle.remove()


def _shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*"))}


def _finetune(data: Path, cache: Path, out: Path, layer: str) -> dict:
    cell = ["--layer", layer, "--alpha", "0.4", "--seed", "0", "--data-seed", "0", "--quiet"]
    assert main(["finetune", "--data", str(data), *SMALL, "--cache", str(cache), "--out", str(out), *cell]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_one_pass_for_all_layers_into_the_caches_finetune_uses(tmp_path: Path, stem_rows: StemRows, capsys) -> None:
    data = write_folder(tmp_path / "imgs", per_class=6, size=40)
    cache = tmp_path / "cache"
    sweep = ["sweep", "--data", str(data), *SMALL, "--cache", str(cache), "--layers", "layer3", "layer4"]
    sweep += ["--alpha", "0.4", "--seeds", "2", "--out", str(tmp_path / "s")]
    assert main(sweep) == 0
    assert stem_rows.take() == 18  # 18 images, each through the backbone once (not once per layer)
    bars = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "extracting" in line]
    assert {bar.partition(":")[0] for bar in bars} == {"extracting train features", "extracting val features"}
    assert all("features: layer3, layer4+avgpool+flatten" in bar for bar in bars)
    stored = sorted(p.name for p in cache.iterdir())
    assert len(stored) == 4  # train / val × the layer3 map / the pooled layer4 features
    records = json.loads((tmp_path / "s" / "sweep.json").read_text())["records"]
    cells = {r["layer"]: r for r in records if r["alpha"] == 0.4 and r["seed"] == 0}

    # a fresh finetune at each layer writes the same directories with the same shard bytes ...
    worst = 0.0
    for layer in ("layer3", "layer4"):
        fresh = tmp_path / f"fresh-{layer}"
        final = _finetune(data, fresh, tmp_path / f"f-{layer}", layer)["final"]
        assert stem_rows.take() == 18
        for directory in fresh.iterdir():
            assert directory.name in stored and _shards(directory) == _shards(cache / directory.name)
        worst = max(worst, *(abs(cells[layer][k] - final[k]) for k in ("val_nll", "val_accuracy", "train_loss")))
    assert worst <= TOLERANCE

    # ... and finetune on the sweep's cache reuses it, extracting nothing and adding no directory
    assert _finetune(data, cache, tmp_path / "again", "layer4")["cache_reused"] == {"train": True, "val": True}
    assert stem_rows.take() == 0 and sorted(p.name for p in cache.iterdir()) == stored

    # a second sweep loads every layer: no backbone pass, the same cells
    assert main([*sweep[:-1], str(tmp_path / "s2"), "--quiet"]) == 0
    assert stem_rows.take() == 0
    again = json.loads((tmp_path / "s2" / "sweep.json").read_text())["records"]
    assert again == records


def test_a_sweep_without_cache_extracts_in_memory_in_one_pass(tmp_path: Path, stem_rows: StemRows) -> None:
    data = write_folder(tmp_path / "imgs", per_class=6, size=40)
    sweep = ["sweep", "--data", str(data), *SMALL, "--layers", "layer2", "layer4", "--alpha", "0.4", "--seeds", "2"]
    assert main([*sweep, "--quiet", "--out", str(tmp_path / "s")]) == 0
    assert stem_rows.take() == 18
    layers = {r["layer"] for r in json.loads((tmp_path / "s" / "sweep.json").read_text())["records"]}
    assert layers == {"layer2", "layer4"}
