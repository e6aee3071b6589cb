"""Capturing module inputs (`<module>:input`): names, storage, and values checked against
plain PyTorch hooks on an unpadded single-document forward."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import crowstream as cs
from crowstream.format.layout import check_module_name
from crowstream.errors import ConfigError, ModuleNotFoundInModel
from helpers import manifest_of, read_rows

INPUTS = ["transformer.h.0.ln_2:input", "transformer.h.1:input"]
OUTPUTS = ["transformer.h.0", "transformer.h.0.attn"]


@pytest.fixture(scope="module")
def captured(gpt2, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inputs") / "out")
    # deliberately listed out of execution order: inputs after outputs they precede
    run = cs.capture(gpt2[0], corpus[:12], [*OUTPUTS, *INPUTS], out, tokenizer=gpt2[1],
                     batch_size=4, progress=False)
    return run


def hooked_forward(model, ids) -> dict[str, torch.Tensor]:
    """Plain hooks, one unpadded document: what each name should hold, [T, d]."""
    seen = {}
    block, ln_2, attn = (model.get_submodule(n) for n in
                         ("transformer.h.0", "transformer.h.0.ln_2", "transformer.h.0.attn"))
    def keep(key, pick):
        def hook(*args):  # returns None, so the hook changes nothing
            seen.setdefault(key, pick(*args)[0].clone())
        return hook

    handles = [
        ln_2.register_forward_pre_hook(keep("ln_2_in", lambda m, a: a[0])),
        attn.register_forward_hook(keep("attn_out", lambda m, a, o: o[0])),
        block.register_forward_pre_hook(keep("block_in", lambda m, a, k: a[0] if a else
                                             k["hidden_states"]), with_kwargs=True),
        block.register_forward_hook(keep("block_out", lambda m, a, o: o)),
    ]
    try:
        with torch.inference_mode():
            model(input_ids=ids[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_inputs_stored_under_at_input_dirs(captured):
    manifest = manifest_of(captured.path)
    assert list(manifest.modules) == [*OUTPUTS, *INPUTS]
    assert manifest.modules["transformer.h.0.ln_2:input"].path == \
        "data/module=transformer.h.0.ln_2@input"
    assert manifest.modules["transformer.h.1:input"].type == "GPT2Block"
    dirs = sorted(os.listdir(os.path.join(captured.path, "data")))
    assert dirs == sorted(["module=transformer.h.0", "module=transformer.h.0.attn",
                           "module=transformer.h.0.ln_2@input", "module=transformer.h.1@input"])
    assert not any(":" in name for _, _, files in os.walk(captured.path) for name in files)
    assert cs.verify(captured.path)["rows"] == 4 * captured.tokens["transformer.h.0"]


def test_input_values_equal_plain_hooks(captured, gpt2, corpus):
    """ln_2's input is the residual stream after attention (block input + attention
    output); block 1's input is block 0's output, bit for bit."""
    model, tokenizer = gpt2
    rows = read_rows(captured.path)
    doc_ids, positions = rows["transformer.h.0"][0], rows["transformer.h.0"][1]
    for name in INPUTS:
        assert np.array_equal(rows[name][0], doc_ids) and np.array_equal(rows[name][1], positions)
    np.testing.assert_array_equal(rows["transformer.h.1:input"][3], rows["transformer.h.0"][3])
    checked = 0
    for doc in np.unique(doc_ids)[:6]:
        ids = torch.tensor(tokenizer(corpus[doc], truncation=True, max_length=64)["input_ids"])
        want = hooked_forward(model, ids)
        at = doc_ids == doc
        got_ln2 = rows["transformer.h.0.ln_2:input"][3][at]
        np.testing.assert_allclose(got_ln2, want["ln_2_in"].numpy(), atol=1e-5, rtol=0)
        residual = want["block_in"] + want["attn_out"]
        np.testing.assert_allclose(got_ln2, residual.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(rows["transformer.h.1:input"][3][at],
                                   want["block_out"].numpy(), atol=1e-5, rtol=0)
        checked += 1
    assert checked == 6
    # the input really differs from the module's own output (not a copy of the wrong tensor)
    assert not np.allclose(rows["transformer.h.0.ln_2:input"][3], rows["transformer.h.0"][3])


def test_input_globs_and_errors(gpt2, corpus, tmp_path):
    from crowstream.pipeline.probe import resolve_modules

    model = gpt2[0]
    assert resolve_modules(model, ["transformer.h.*:input"]) == [
        "transformer.h.0:input", "transformer.h.1:input", "transformer.h.2:input"]
    assert resolve_modules(model, ["transformer.h.0", "transformer.h.0:input"]) == [
        "transformer.h.0", "transformer.h.0:input"]
    with pytest.raises(ModuleNotFoundInModel, match=r"'transformer\.h\.0\.nope' is not in"):
        resolve_modules(model, ["transformer.h.0.nope:input"])
    with pytest.raises(ModuleNotFoundInModel, match=r"'transformer\.h\.0:output' is not in"):
        resolve_modules(model, ["transformer.h.0:output"])
    with pytest.raises(ConfigError, match="cannot be used as a directory name"):
        check_module_name("../x:input")


def test_one_module_glob_matcher_for_capture_and_readers():
    from crowstream.format.layout import match_modules

    names = ["h.0", "h.0.mlp", "h.0:input", "h.1", "h.1:input", "h.12", "wte"]
    assert match_modules("h.*", names) == ["h.0", "h.1", "h.12"]
    assert match_modules("h.*:input", names) == ["h.0:input", "h.1:input"]
    assert match_modules("h.**", names) == ["h.0", "h.0.mlp", "h.1", "h.12"]
    assert match_modules("h.?", names) == ["h.0", "h.1"]
    assert match_modules("h.[1]*", names) == ["h.1", "h.12"]
    assert match_modules("h.0:input", names) == ["h.0:input"]
    assert match_modules("h.0:inp*", names) == match_modules("h.2", names) == []


def test_stream_and_load_read_inputs(captured, tmp_path):
    both = next(iter(cs.stream(captured.path, ["transformer.h.0", "transformer.h.1:input"],
                               batch_size=10_000)))
    assert torch.equal(both["transformer.h.0"], both["transformer.h.1:input"])
    ds = cs.load(captured.path, "transformer.h.0.ln_2:input", cache_dir=str(tmp_path))
    assert ds.num_rows == captured.tokens["transformer.h.0.ln_2:input"]
