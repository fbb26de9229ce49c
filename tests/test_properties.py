"""Property tests (hypothesis) of the hooked mixing path, over random shapes (B, C, H, W) / (B, N, D) /
sequence-first (N, B, D), dtypes float32 / bfloat16 / float16, α, λ modes and seeds:

* the mixed activation is the convex combination ``λ·a + (1−λ)·a[perm]`` within the dtype's rounding,
  with dtype, shape and memory format kept and unmixed rows bitwise unchanged;
* partners always form one valid cycle through the batch;
* excluded classes are never mixed, in the activations or the targets;
* soft targets from class indices (label smoothing included) are distributions: each row sums to 1.

Examples are derandomized (the same every run) and few, so the file stays fast and never flaky.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hookmix import HookMixer

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("BCHW", "BCHW channels_last", "BND", "NBD")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a shared 2-core machine only loses time to a second thread
    yield
    torch.set_num_threads(threads)


@st.composite
def activations(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """A random activation and its batch dim: (B, C, H, W) (maybe channels_last), (B, N, D) or (N, B, D)."""
    layout = draw(st.sampled_from(LAYOUTS))
    batch = draw(st.integers(2, 8))
    dims = draw(st.lists(st.integers(1, 5), min_size=3, max_size=3))
    shape = {"BND": (batch, dims[0], dims[1]), "NBD": (dims[0], batch, dims[1])}.get(layout, (batch, *dims))
    scale = draw(st.sampled_from((1e-3, 1.0, 300.0)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(draw(st.sampled_from(DTYPES)))
    if layout == "BCHW channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x, 1 if layout == "NBD" else 0


def mixed_by_hook(x: torch.Tensor, batch_dim: int, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, λ, partners) of one training forward of an identity layer hooked by a HookMixer."""
    model = nn.Sequential(nn.Identity())
    with HookMixer(model, "0", batch_dim=batch_dim, **options) as mixer:
        step = mixer.plan(batch_size=x.shape[batch_dim])
        out = model(x)
    return out, step.lam, step.perm


@PROPERTY
@given(activations(), st.floats(0.05, 5.0), st.sampled_from(("batch", "sample")), st.integers(0, 2**31 - 1))
def test_mixing_is_a_convex_combination_within_dtype_rounding(
    activation: tuple[torch.Tensor, int], alpha: float, lam_mode: str, seed: int
) -> None:
    x, batch_dim = activation
    out, lam, perm = mixed_by_hook(x, batch_dim, alpha=alpha, lam_mode=lam_mode, seed=seed)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    assert bool(((lam >= 0) & (lam <= 1)).all())
    a, b = x.movedim(batch_dim, 0).double(), x.movedim(batch_dim, 0)[perm].double()
    got = out.movedim(batch_dim, 0).double()
    w = lam.double().view(-1, *[1] * (a.dim() - 1))
    eps = torch.finfo(x.dtype).eps
    size = a.abs() + b.abs()
    assert bool(((got - (w * a + (1 - w) * b)).abs() <= 2 * eps * size + torch.finfo(x.dtype).tiny).all())
    low, high = torch.minimum(a, b), torch.maximum(a, b)
    assert bool(((got >= low - eps * size) & (got <= high + eps * size)).all())
    kept = lam == 1
    assert torch.equal(got[kept], a[kept])  # unmixed rows are bitwise the input


@PROPERTY
@given(st.integers(1, 64), st.sampled_from(("batch", "sample")), st.booleans(), st.integers(0, 2**31 - 1))
def test_partners_form_one_cycle_through_the_batch(batch: int, lam_mode: str, dominant: bool, seed: int) -> None:
    with HookMixer(nn.Linear(2, 2), "input", lam_mode=lam_mode, dominant=dominant, seed=seed) as mixer:
        step = mixer.plan(batch_size=batch)
    perm = step.perm.tolist()
    assert sorted(perm) == list(range(batch))
    if batch == 1:
        assert not step.mixed and step.lam.tolist() == [1.0]
        return
    row, visited = 0, set()
    while row not in visited:
        visited.add(row)
        row = perm[row]
    assert len(visited) == batch and row == 0  # one cycle: no row is its own partner, none is left out
    assert bool(((step.lam >= 0) & (step.lam <= 1)).all())
    if lam_mode == "batch":
        assert bool((step.lam == step.lam[0]).all())
    if dominant:
        assert bool((step.lam >= 0.5).all())


@st.composite
def labelled_batches(draw: st.DrawFn) -> tuple[torch.Tensor, int, list[int]]:
    """Class indices (B,) or multi-label targets (B, C), C, and a non-empty list of excluded classes."""
    classes = draw(st.integers(2, 6))
    batch = draw(st.integers(2, 12))
    if draw(st.booleans()):
        y = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch)))
    else:
        bits = draw(st.lists(st.integers(0, 1), min_size=batch * classes, max_size=batch * classes))
        y = torch.tensor(bits).view(batch, classes)
    excluded = draw(st.lists(st.integers(0, classes - 1), min_size=1, max_size=classes - 1, unique=True))
    return y, classes, excluded


@PROPERTY
@given(labelled_batches(), st.sampled_from(("batch", "sample")), st.integers(0, 2**31 - 1))
def test_excluded_classes_are_never_mixed(batch: tuple[torch.Tensor, int, list[int]], lam_mode: str, seed: int) -> None:
    y, classes, excluded = batch
    x = torch.randn(y.shape[0], 3, generator=torch.Generator().manual_seed(seed))
    model = nn.Sequential(nn.Identity())
    with HookMixer(model, "0", lam_mode=lam_mode, num_classes=classes, exclude_classes=excluded, seed=seed) as mixer:
        step = mixer.plan(y)
        out = model(x)
    is_excluded = torch.isin(y, torch.tensor(excluded)) if y.dim() == 1 else y[:, excluded].bool().any(dim=1)
    keep = is_excluded | is_excluded[step.perm]
    assert bool((step.lam[keep] == 1).all())
    assert torch.equal(out[keep], x[keep])
    own = F.one_hot(y, classes).float() if y.dim() == 1 else y.float()
    assert torch.equal(step.targets[keep], own[keep])
    if lam_mode == "batch" and not keep.all():
        free = step.lam[~keep]
        assert bool((free == free[0]).all())  # the other rows keep the step's one λ


@PROPERTY
@given(
    st.integers(2, 10),
    st.integers(1, 16),
    st.floats(0.0, 0.9),
    st.sampled_from(("batch", "sample")),
    st.integers(0, 2**31 - 1),
)
def test_soft_targets_from_class_indices_sum_to_one(
    classes: int, batch: int, smoothing: float, lam_mode: str, seed: int
) -> None:
    y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    model = nn.Sequential(nn.Identity())
    with HookMixer(model, "0", lam_mode=lam_mode, num_classes=classes, label_smoothing=smoothing, seed=seed) as mixer:
        step = mixer.plan(y)
        model(torch.randn(batch, 2))
    targets = step.targets
    assert targets.shape == (batch, classes) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(batch), rtol=0, atol=1e-5)
    assert bool(((targets >= 0) & (targets <= 1 + 1e-6)).all())
    smooth = F.one_hot(y, classes).float() * (1 - smoothing) + smoothing / classes
    lam = step.lam.view(-1, 1)
    torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth[step.perm], rtol=0, atol=1e-6)
