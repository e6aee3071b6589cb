"""The examples run as a user would run them: a fresh interpreter, from another directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_quickstart(tmp_path):
    out = tmp_path / "acts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}  # keep load_dataset's cache here
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "quickstart.py"), str(out)],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    text = result.stdout
    assert "6 encoder blocks, e.g. encoder.layer.0 -> (2, " in text
    rows = re.search(r"captured 100 documents: encoder\.layer\.2 \(d=384\): ([\d,]+) rows, "
                     r"encoder\.layer\.5 \(d=384\): \1 rows", text)
    assert rows, text
    assert f"cs.load: {rows.group(1)} rows; a batch of 256 -> vector (256, 384) torch.float32" in text
    assert "cs.stream: first shuffled batch (1024, 384)" in text
    assert len(re.findall(r"^  encoder\.layer\.[25] +'.+' +seen +\d+x  mean norm [\d.]+$", text, re.M)) == 6
    assert re.search(r"^longest document: #\d+, 128 tokens: ", text, re.M)
    # what it wrote is a complete, intact crowstream output
    import crowstream as cs

    assert cs.verify(str(out))["rows"] == 2 * int(rows.group(1).replace(",", ""))
    assert cs.info(str(out))["status"] == "complete"


def _run_example(script: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_train_sae_loss_falls_and_explained_variance_rises(gpt2, corpus, tmp_path):
    import json

    import crowstream as cs
    from safetensors.torch import load_file

    out = str(tmp_path / "acts")
    cs.capture(gpt2[0], corpus[:60], ["transformer.h.2"], out, tokenizer=gpt2[1], progress=False)
    result = _run_example("train_sae.py", [out, "transformer.h.2", "--expansion", "4", "--k", "8",
                                           "--steps", "300", "--batch-size", "256",
                                           "--lr", "2e-3", "--shuffle-buffer", "2000",
                                           "--log-every", "50", "--dead-steps", "100",
                                           "--save", "sae.safetensors"], tmp_path)
    logs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [m["step"] for m in logs] == [50, 100, 150, 200, 250, 300]
    assert logs[-1]["mse"] < 0.5 * logs[0]["mse"], logs
    assert logs[-1]["explained_variance"] > logs[0]["explained_variance"] + 0.1, logs
    assert logs[-1]["explained_variance"] > 0.6, logs
    assert 0 <= logs[-1]["dead_fraction"] < 1
    weights = load_file(str(tmp_path / "sae.safetensors"))
    assert weights["W_enc"].shape == (64, 256) and weights["W_dec"].shape == (256, 64)
    assert torch_allclose_rows(weights["W_dec"])


def torch_allclose_rows(w) -> bool:
    """Decoder rows have unit norm, as the SAE keeps them."""
    return bool(((w.norm(dim=1) - 1).abs() < 1e-4).all())


def test_train_with_saelens(gpt2, corpus, tmp_path):
    """SAELens' SAETrainer trains on cs.stream; runs when the `sae` extra is installed."""
    pytest.importorskip("sae_lens")
    import importlib.util

    import torch

    import crowstream as cs

    out = str(tmp_path / "acts")
    cs.capture(gpt2[0], corpus[:60], ["transformer.h.2"], out, tokenizer=gpt2[1], progress=False)
    spec = importlib.util.spec_from_file_location(
        "train_with_saelens", os.path.join(EXAMPLES, "train_with_saelens.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    sae = example.train(out, "transformer.h.2", expansion=4, k=8, steps=300, batch_size=256,
                        lr=2e-3, shuffle_buffer=2000, save=str(tmp_path / "sae"))
    assert sorted(os.listdir(tmp_path / "sae")) == ["cfg.json", "sae_weights.safetensors"]
    x = next(iter(cs.stream(out, "transformer.h.2", batch_size=2000)))["vector"]  # raw rows
    with torch.no_grad():
        explained = 1 - (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert explained > 0.6, explained  # the scaling factor is folded in: raw rows work
