"""examples/tabular.py: the embedded table, one plan across every embedding and the continuous block,
and a short end-to-end run."""

import importlib.util
from pathlib import Path

import pytest
import torch

from hookmix import HookMixer

spec = importlib.util.spec_from_file_location("tabular", Path(__file__).parents[2] / "examples" / "tabular.py")
tabular = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tabular)


def test_table_bins_and_standardises_from_training_rows():
    (c_tr, x_tr, y_tr), (c_va, x_va, y_va) = tabular.load_table(6, seed=0)
    assert c_tr.shape == (455, 6) and x_tr.shape == (455, 24) and len(y_va) == 114
    assert c_tr.min() >= 0 and c_tr.max() == tabular.BINS - 1
    torch.testing.assert_close(x_tr.mean(0), torch.zeros(24), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_fastai", [False, True])
def test_every_embedding_and_the_continuous_input_share_one_plan(use_fastai):
    if use_fastai:
        pytest.importorskip("fastai.tabular.model")
    (c, x, y), _ = tabular.load_table(3, seed=0)
    model = tabular.build_model(3, x.shape[1], use_fastai)
    raw, mixed = {}, {}
    for i in range(3):
        model.embeds[i].register_forward_hook(lambda m, a, o, i=i: raw.__setitem__(i, o.detach().clone()))
    with HookMixer(model, ["embeds.*", "input"], mode="all", lam_mode="sample", seed=0) as mixer:
        for i in range(3):
            model.embeds[i].register_forward_hook(lambda m, a, o, i=i: mixed.__setitem__(i, o.detach().clone()))
        model.register_forward_pre_hook(lambda m, a: mixed.__setitem__("cont", a[1].detach().clone()))
        step = mixer.plan(y[:8])
        model.train()
        model(c[:8], x[:8])
    lam = step.lam[:, None]
    for i in range(3):
        torch.testing.assert_close(mixed[i], lam * raw[i] + (1 - lam) * raw[i][step.perm])
    torch.testing.assert_close(mixed["cont"], lam * x[:8] + (1 - lam) * x[:8][step.perm])


def test_example_runs_end_to_end(capsys):
    tabular.main(["--seeds", "2", "--epochs", "2"])
    out = capsys.readouterr().out
    assert "| no |" in out and "| yes |" in out and "±" in out
