"""Third-party and plain-torch trainers fed by `cs.stream` (#18): a few hundred steps each
on a tiny synthetic output; the loss must fall. sparsify is in the `test` extra, so CI
runs it; it is skipped only where sparsify is not installed."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trainers") / "out")
    _load("benchmarks/loader.py", "bench_loader").write_synthetic(
        out, rows=20_000, d=16, files=4, doc_tokens=10)
    return out


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                            "ignore::UserWarning")
def test_train_with_sparsify_loss_falls(synthetic):
    pytest.importorskip("sparsify")
    import torch

    torch.manual_seed(0)
    example = _load("examples/train_with_sparsify.py", "train_with_sparsify")
    sae, log = example.train(synthetic, "synthetic", expansion=8, k=4, steps=300,
                             batch_size=256, lr=2e-3, shuffle_buffer=4096, log_every=50)
    assert [step for step, _ in log] == [50, 100, 150, 200, 250, 300]
    assert log[-1][1] < 0.8 * log[0][1], log  # fraction of variance unexplained falls
    assert sae.num_latents == 128
