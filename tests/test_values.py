"""The correctness guarantee: every stored row equals the module output of a plain,
unpadded, single-document forward pass, whatever the batch size, the padding, the order
the modules are named in, truncation or chunking, and the output dtype.

The reference here is deliberately independent of crowstream: `register_forward_hook`
on the module, one document (or one chunk window) per forward, no padding, no mask, no
nnsight. Stored rows are read back with pyarrow straight from the part files.
"""

from __future__ import annotations

import glob
import inspect
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import crowstream as cs

GPT2_MODULES = ["transformer.h.2", "transformer.h.1.mlp", "transformer.h.0"]  # deepest first
MINILM_MODULES = ["encoder.layer.2", "encoder.layer.1.attention",  # a tuple output
                  "encoder.layer.0.attention.output.dense"]          # a Linear inside a block
ATOL32 = 1e-5  # fp32: batched-and-padded vs single forwards differ by a few ulps (~5e-6 seen)
RTOL32 = 1e-5  # MiniLM's residual stream reaches |x| ~ 30, where one ulp is ~2e-6


# -- the independent reference ---------------------------------------------------------

class Reference:
    """Module outputs of unpadded single-sequence forwards, cached per token sequence."""

    def __init__(self, model, modules):
        self.model, self.modules, self.cache = model, list(modules), {}
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
        self.no_cache = {"use_cache": False} if takes_cache else {}  # same outputs, faster

    def forward(self, ids: list[int]) -> dict[str, np.ndarray]:
        key = tuple(ids)
        if key not in self.cache:
            seen = {}

            def hook(name):
                def record(module, args, output):
                    value = output[0] if isinstance(output, tuple) else output
                    seen[name] = value[0].detach().float().numpy().copy()
                return record

            handles = [self.model.get_submodule(n).register_forward_hook(hook(n)) for n in self.modules]
            try:
                with torch.inference_mode():
                    self.model(input_ids=torch.tensor([ids]), **self.no_cache)
            finally:
                for handle in handles:
                    handle.remove()
            assert all(seen[n].shape[0] == len(ids) for n in self.modules)
            self.cache[key] = seen
        return self.cache[key]

    def expected(self, tokenizer, texts: dict[int, str], *, context_size: int, overflow: str):
        """-> {doc_id: (ids [T], {module: [T, d] float32})} as crowstream should store them:
        truncate = tokenizer(text, truncation=True, max_length=context_size); chunk = exactly
        tokenizer(text)["input_ids"], each context_size window its own forward."""
        docs = {}
        for doc_id, text in texts.items():
            if overflow == "truncate":
                ids = tokenizer(text, truncation=True, max_length=context_size)["input_ids"]
            else:
                ids = tokenizer(text)["input_ids"]
            windows = [ids[s:s + context_size] for s in range(0, len(ids), context_size)]
            outputs = [self.forward(w) for w in windows]
            vectors = {m: (np.concatenate([o[m] for o in outputs]) if outputs else None)
                       for m in self.modules}
            docs[doc_id] = (np.asarray(ids, dtype=np.int64), vectors)
        return docs


# -- reading what crowstream wrote, without crowstream ----------------------------------

def read_rows(out, module) -> dict[str, np.ndarray]:
    files = sorted(glob.glob(os.path.join(out, "data", f"module={module}", "*.parquet")))
    assert files, f"no part files for {module}"
    table = pa.concat_tables([pq.ParquetFile(f).read() for f in files])
    vector = table.column("vector").combine_chunks()
    d = vector.type.list_size
    return {"doc_id": table.column("doc_id").to_numpy(),
            "position": table.column("position").to_numpy(),
            "token": table.column("token").to_numpy(),
            "vector": vector.flatten().to_numpy(zero_copy_only=False).reshape(-1, d),
            "value_type": vector.type.value_type}


def read_docs(out) -> dict[int, int]:
    files = sorted(glob.glob(os.path.join(out, "docs", "*.parquet")))
    table = pa.concat_tables([pq.ParquetFile(f).read() for f in files])
    doc_ids = table.column("doc_id").to_pylist()
    assert len(doc_ids) == len(set(doc_ids)), "a document is recorded twice in docs/"
    return dict(zip(doc_ids, table.column("n_tokens").to_pylist()))


def check_capture(run, expected, modules, *, excluded=(), dtype="float32", atol=ATOL32):
    """Every row of every module equals the reference; counts and docs add up."""
    out = run.path
    excluded = np.asarray(sorted(excluded), dtype=np.int64)
    assert read_docs(out) == {doc: len(ids) for doc, (ids, _) in expected.items()}
    assert run.docs == len(expected)
    for module in modules:
        rows = read_rows(out, module)
        n = len(rows["doc_id"])
        keys = rows["doc_id"].astype(np.int64) * 1_000_000 + rows["position"]
        assert len(np.unique(keys)) == n, f"{module}: duplicate (doc_id, position) rows"
        order = np.lexsort((rows["position"], rows["doc_id"]))

        want_doc, want_pos, want_tok, want_vec = [], [], [], []
        for doc in sorted(expected):
            ids, vectors = expected[doc]
            keep = ~np.isin(ids, excluded)
            want_doc.append(np.full(int(keep.sum()), doc, dtype=np.int64))
            want_pos.append(np.flatnonzero(keep))
            want_tok.append(ids[keep])
            if vectors[module] is not None:
                want_vec.append(vectors[module][keep])
        want_doc, want_pos, want_tok = map(np.concatenate, (want_doc, want_pos, want_tok))
        want_vec = np.concatenate(want_vec)

        assert n == len(want_doc) == run.tokens[module], (
            f"{module}: {n} rows stored, {len(want_doc)} kept tokens expected, run says {run.tokens[module]}")
        np.testing.assert_array_equal(rows["doc_id"][order], want_doc)
        np.testing.assert_array_equal(rows["position"][order], want_pos)
        np.testing.assert_array_equal(rows["token"][order], want_tok)
        got = rows["vector"][order]
        if dtype == "float16":
            assert rows["value_type"] == pa.float16()
            want = want_vec.astype(np.float16).astype(np.float32)
            # one fp16 ulp at the value's magnitude (fp32 noise can flip a rounding)
            np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=1e-4,
                                       err_msg=module)
        else:
            assert rows["value_type"] == pa.float32()
            np.testing.assert_allclose(got, want_vec, rtol=RTOL32, atol=atol, err_msg=module)
        # the test can fail: rows of different positions differ far beyond the tolerance
        assert np.abs(want_vec[1:] - want_vec[:-1]).max() > 100 * atol


def assert_untouched(model, tokenizer, *, pad_token, padding_side):
    for name, module in model.named_modules():
        for key in ("forward", "__nnsight__"):
            assert key not in module.__dict__, f"{key} left on {name or 'the model'}"
        assert not module._forward_hooks, f"forward hook left on {name}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name}"
    assert not torch.nn.modules.module._global_forward_hooks
    assert tokenizer.pad_token == pad_token
    assert tokenizer.padding_side == padding_side


def capture(model, tokenizer, texts, modules, out, **kwargs):
    kwargs.setdefault("progress", False)
    return cs.capture(model, texts, modules, str(out), tokenizer=tokenizer, **kwargs)


# -- tiny GPT-2 (no pad token, causal) --------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_ref(gpt2):
    return Reference(gpt2[0], GPT2_MODULES)


@pytest.fixture(scope="module")
def gpt2_texts(corpus):
    return dict(enumerate(corpus[:24]))  # 6 to 256 tokens


@pytest.fixture(scope="module")
def gpt2_expected(gpt2, gpt2_ref, gpt2_texts):
    return gpt2_ref.expected(gpt2[1], gpt2_texts, context_size=64, overflow="truncate")


def test_gpt2_corpus_exercises_truncation(gpt2, gpt2_texts):
    lengths = [len(gpt2[1](t)["input_ids"]) for t in gpt2_texts.values()]
    assert min(lengths) < 16 and max(lengths) > 64  # padding and truncation both happen


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_gpt2_rows_equal_unpadded_forward(gpt2, gpt2_texts, gpt2_expected, batch_size, tmp_path):
    model, tokenizer = gpt2
    run = capture(model, tokenizer, list(gpt2_texts.values()), GPT2_MODULES, tmp_path / "out",
                  batch_size=batch_size)
    assert run.modules == {"transformer.h.2": 64, "transformer.h.1.mlp": 64, "transformer.h.0": 64}
    assert list(run.modules) == GPT2_MODULES  # the order the user gave
    check_capture(run, gpt2_expected, GPT2_MODULES)
    assert run.manifest.counts.tokens_fed == sum(len(ids) for ids, _ in gpt2_expected.values())
    assert_untouched(model, tokenizer, pad_token=None, padding_side="right")


def test_gpt2_max_batch_tokens(gpt2, gpt2_texts, gpt2_expected, tmp_path):
    model, tokenizer = gpt2
    run = capture(model, tokenizer, list(gpt2_texts.values()), ["transformer.h.0", "transformer.h.2"],
                  tmp_path / "out", batch_size=32, max_batch_tokens=50)  # < one full window
    check_capture(run, gpt2_expected, ["transformer.h.0", "transformer.h.2"])


def test_gpt2_chunk_positions_absolute(gpt2, gpt2_ref, gpt2_texts, tmp_path):
    model, tokenizer = gpt2
    texts = dict(list(gpt2_texts.items())[:16])
    expected = gpt2_ref.expected(tokenizer, texts, context_size=20, overflow="chunk")
    assert max(len(ids) for ids, _ in expected.values()) > 64  # longer than the model's positions
    run = capture(model, tokenizer, list(texts.values()), GPT2_MODULES, tmp_path / "out",
                  context_size=20, overflow="chunk", batch_size=7)
    check_capture(run, expected, GPT2_MODULES)
    rows = read_rows(run.path, "transformer.h.0")
    assert rows["position"].max() > 64


def test_gpt2_truncate_context_size(gpt2, gpt2_ref, gpt2_texts, tmp_path):
    model, tokenizer = gpt2
    texts = dict(list(gpt2_texts.items())[:16])
    expected = gpt2_ref.expected(tokenizer, texts, context_size=24, overflow="truncate")
    run = capture(model, tokenizer, list(texts.values()), ["transformer.h.1.mlp"], tmp_path / "out",
                  context_size=24, batch_size=8)
    check_capture(run, expected, ["transformer.h.1.mlp"])
    assert read_rows(run.path, "transformer.h.1.mlp")["position"].max() == 23


def test_gpt2_float16(gpt2, gpt2_texts, gpt2_expected, tmp_path):
    model, tokenizer = gpt2
    run = capture(model, tokenizer, list(gpt2_texts.values()), ["transformer.h.2", "transformer.h.0"],
                  tmp_path / "out", dtype="float16", batch_size=16)
    check_capture(run, gpt2_expected, ["transformer.h.2", "transformer.h.0"], dtype="float16")
    assert run.manifest.modules["transformer.h.2"].dtype == "float16"


def test_gpt2_exclude_token_ids(gpt2, gpt2_texts, gpt2_expected, tmp_path):
    model, tokenizer = gpt2
    all_ids = np.concatenate([ids for ids, _ in gpt2_expected.values()])
    values, counts = np.unique(all_ids, return_counts=True)
    common = [int(v) for v in values[np.argsort(-counts)[:2]]]
    run = capture(model, tokenizer, list(gpt2_texts.values()), ["transformer.h.2"], tmp_path / "out",
                  exclude_token_ids=common, batch_size=16)
    check_capture(run, gpt2_expected, ["transformer.h.2"], excluded=common)
    assert run.tokens["transformer.h.2"] == len(all_ids) - int(np.isin(all_ids, common).sum())


def test_gpt2_left_padding_tokenizer(gpt2_dir, gpt2, gpt2_texts, gpt2_expected, tmp_path):
    """A tokenizer configured for left padding changes nothing, and stays left-padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir, padding_side="left")
    assert tokenizer.pad_token is None
    run = capture(gpt2[0], tokenizer, list(gpt2_texts.values()), ["transformer.h.2"], tmp_path / "out",
                  batch_size=16)
    check_capture(run, gpt2_expected, ["transformer.h.2"])
    assert_untouched(gpt2[0], tokenizer, pad_token=None, padding_side="left")


def test_gpt2_model_left_as_found_after_failure(gpt2, gpt2_texts, tmp_path):
    """A run that dies mid-corpus still puts the model back and leaves no thread."""
    model, tokenizer = gpt2
    texts = [*list(gpt2_texts.values())[:5], 12345]
    with pytest.raises(cs.CrowstreamError, match=r"document 5 has type int, not str"):
        capture(model, tokenizer, texts, ["transformer.h.0"], tmp_path / "out", shard_size=2)
    assert_untouched(model, tokenizer, pad_token=None, padding_side="right")


def test_modules_listing_leaves_model_untouched(gpt2):
    model, tokenizer = gpt2
    listing = {name: (kind, shape) for name, kind, shape in cs.modules(model, tokenizer=tokenizer)}
    assert list(listing) == [name for name, _ in model.named_modules() if name]
    kind, shape = listing["transformer.h.0"]
    assert kind == "GPT2Block" and len(shape) == 3 and shape[0] == 2 and shape[2] == 64
    assert listing["transformer.h.1.mlp.c_fc"][1][2] == 256
    assert listing["transformer.h"][1] is None  # a ModuleList never runs
    assert_untouched(model, tokenizer, pad_token=None, padding_side="right")


def test_unknown_module_suggests(gpt2, gpt2_texts, tmp_path):
    model, tokenizer = gpt2
    with pytest.raises(cs.CrowstreamError, match=r"module 'transformer\.h\.1\.mpl' is not in GPT2LMHeadModel; "
                                                 r"did you mean 'transformer\.h\.1\.mlp'"):
        capture(model, tokenizer, list(gpt2_texts.values()), ["transformer.h.1.mpl"], tmp_path / "out")
    with pytest.raises(cs.CrowstreamError, match=r"module pattern 'encoder\.\*' matches no module"):
        capture(model, tokenizer, list(gpt2_texts.values()), ["encoder.*"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- real all-MiniLM-L6-v2 (BERT encoder, [CLS]/[SEP], has a pad token) -----------------

@pytest.fixture(scope="module")
def minilm_ref(minilm):
    return Reference(minilm[0], MINILM_MODULES)


@pytest.fixture(scope="module")
def minilm_texts(corpus):
    return dict(enumerate(corpus[:13]))  # 14 to 129 tokens


@pytest.fixture(scope="module")
def minilm_expected(minilm, minilm_ref, minilm_texts):
    return minilm_ref.expected(minilm[1], minilm_texts, context_size=512, overflow="truncate")


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_minilm_rows_equal_unpadded_forward(minilm, minilm_texts, minilm_expected, batch_size, tmp_path):
    model, tokenizer = minilm
    pad, side = tokenizer.pad_token, tokenizer.padding_side
    run = capture(model, tokenizer, list(minilm_texts.values()), MINILM_MODULES, tmp_path / "out",
                  batch_size=batch_size)
    assert run.modules == dict.fromkeys(MINILM_MODULES, 384)
    check_capture(run, minilm_expected, MINILM_MODULES)
    # special tokens are kept by default: every document starts with [CLS] and ends with [SEP]
    rows = read_rows(run.path, MINILM_MODULES[0])
    assert (rows["token"][rows["position"] == 0] == tokenizer.cls_token_id).all()
    assert (rows["token"] == tokenizer.sep_token_id).sum() == len(minilm_texts)
    assert_untouched(model, tokenizer, pad_token=pad, padding_side=side)


def test_minilm_exclude_special_tokens(minilm, minilm_texts, minilm_expected, tmp_path):
    model, tokenizer = minilm
    run = capture(model, tokenizer, list(minilm_texts.values()), MINILM_MODULES[:2], tmp_path / "out",
                  exclude_special_tokens=True, batch_size=8)
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id}
    check_capture(run, minilm_expected, MINILM_MODULES[:2], excluded=special)
    rows = read_rows(run.path, MINILM_MODULES[0])
    assert not np.isin(rows["token"], list(special)).any()
    assert rows["position"].min() == 1  # positions stay those of the full sequence
    assert len(rows["token"]) == sum(len(ids) - 2 for ids, _ in minilm_expected.values())
    # the documents still record every token fed, specials included
    assert read_docs(run.path) == {d: len(ids) for d, (ids, _) in minilm_expected.items()}


def test_minilm_exclude_token_ids(minilm, minilm_texts, minilm_expected, tmp_path):
    model, tokenizer = minilm
    the = tokenizer.convert_tokens_to_ids("the")
    excluded = [the, tokenizer.sep_token_id]
    run = capture(model, tokenizer, list(minilm_texts.values()), [MINILM_MODULES[2]], tmp_path / "out",
                  exclude_token_ids=excluded, batch_size=16)
    check_capture(run, minilm_expected, [MINILM_MODULES[2]], excluded=excluded)
    rows = read_rows(run.path, MINILM_MODULES[2])
    assert (rows["token"] == tokenizer.cls_token_id).sum() == len(minilm_texts)


def test_minilm_chunk(minilm, minilm_ref, minilm_texts, tmp_path):
    model, tokenizer = minilm
    expected = minilm_ref.expected(tokenizer, minilm_texts, context_size=32, overflow="chunk")
    run = capture(model, tokenizer, list(minilm_texts.values()), MINILM_MODULES, tmp_path / "out",
                  context_size=32, overflow="chunk", batch_size=6)
    check_capture(run, expected, MINILM_MODULES)
    # exactly the untruncated ids: one [CLS] and one [SEP] per document, not per window
    rows = read_rows(run.path, MINILM_MODULES[0])
    assert (rows["token"] == tokenizer.cls_token_id).sum() == len(minilm_texts)
    assert (rows["token"] == tokenizer.sep_token_id).sum() == len(minilm_texts)


def test_minilm_truncate(minilm, minilm_ref, minilm_texts, tmp_path):
    model, tokenizer = minilm
    expected = minilm_ref.expected(tokenizer, minilm_texts, context_size=32, overflow="truncate")
    run = capture(model, tokenizer, list(minilm_texts.values()), MINILM_MODULES[:1], tmp_path / "out",
                  context_size=32, batch_size=5)
    check_capture(run, expected, MINILM_MODULES[:1])
    rows = read_rows(run.path, MINILM_MODULES[0])
    assert rows["position"].max() == 31
    assert (rows["token"][rows["position"] == 31] == tokenizer.sep_token_id).all()


def test_minilm_float16(minilm, minilm_texts, minilm_expected, tmp_path):
    model, tokenizer = minilm
    run = capture(model, tokenizer, list(minilm_texts.values()), MINILM_MODULES, tmp_path / "out",
                  dtype="float16", batch_size=16)
    check_capture(run, minilm_expected, MINILM_MODULES, dtype="float16")


# -- packing: several documents per row, each attending only to itself -------------------

def spy_forwards(monkeypatch) -> list:
    """-> [(rows, pieces, packed)] of every traced forward."""
    from crowstream.pipeline.tracing import ModelTracer

    original, seen = ModelTracer.run, []

    def run(self, batch):
        seen.append((batch.input_ids.shape[0], batch.n_pieces, batch.segments is not None))
        return original(self, batch)

    monkeypatch.setattr(ModelTracer, "run", run)
    return seen


def assert_packed(seen) -> None:
    assert seen and all(packed for _, _, packed in seen)
    assert sum(pieces for _, pieces, _ in seen) > sum(rows for rows, _, _ in seen), \
        "no row held two documents: packing was not exercised"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gpt2_packed_rows_equal_unpadded_forward(gpt2_dir, gpt2_texts, gpt2_expected, attention,
                                                 monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_implementation=attention).eval()
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    seen = spy_forwards(monkeypatch)
    run = capture(model, tokenizer, list(gpt2_texts.values()), GPT2_MODULES, tmp_path / "out",
                  packing="auto", batch_size=4)
    assert_packed(seen)
    check_capture(run, gpt2_expected, GPT2_MODULES)
    assert_untouched(model, tokenizer, pad_token=None, padding_side="right")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_packed_mask_is_bool_for_sdpa_and_additive_for_eager(gpt2_dir, attention):
    from transformers import AutoModelForCausalLM

    from crowstream.pipeline.packing import mask_dtype, packed_mask

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_implementation=attention)
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    allowed = packed_mask(segments, torch.bool)
    assert allowed.shape == (2, 1, 6, 6) and allowed.dtype == torch.bool
    assert allowed[0, 0, 3].tolist() == [False, False, True, True, False, False]
    assert allowed.diagonal(dim1=-2, dim2=-1).all()  # no row fully blocked: sdpa's NaN case
    additive = packed_mask(segments, torch.float32)
    blocked = torch.finfo(torch.float32).min
    assert torch.equal(additive, torch.where(allowed, 0.0, blocked))
    # the same as comparing every pair of tokens: same segment, and not in the future
    pairs = (segments[:, :, None] == segments[:, None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(allowed[:, 0], pairs)
    ragged = torch.randint(0, 3, (4, 40)).sort(dim=1).values  # random run lengths
    assert torch.equal(packed_mask(ragged, torch.bool)[:, 0],
                       (ragged[:, :, None] == ragged[:, None, :]) & torch.ones(40, 40, dtype=torch.bool).tril())
    assert mask_dtype(model) == (torch.bool if attention == "sdpa" else model.dtype)


def test_a_gpu_builds_the_packed_mask_from_the_ids_and_gets_the_hosts(monkeypatch):
    """On CUDA the mask is compared on the device from the [B, T] ids (`_compared`) instead
    of built on the host and copied: the same mask, random run lengths and a tail padding
    segment included (`_compared` runs on the CPU here; the dispatch is checked apart)."""
    from crowstream.pipeline import packing

    generator = torch.Generator().manual_seed(0)
    for width in (1, 7, 64):
        ids = torch.randint(0, 4, (3, width), generator=generator).sort(dim=1).values
        ids[0, width // 2:] = 9  # a row's tail padding: one more segment
        assert torch.equal(packing._compared(ids, "cpu"),
                           torch.from_numpy(packing._blocks(ids.numpy())))
    asked = []

    def on_gpu(ids, device):
        asked.append(device)
        return torch.ones(1, 1, 2, 2, dtype=torch.bool)

    monkeypatch.setattr(packing, "_compared", on_gpu)
    assert packing.packed_mask(torch.zeros(1, 2, dtype=torch.long), torch.bool, "cuda:1").all()
    assert asked == ["cuda:1"]


def test_gpt2_packed_chunks_keep_absolute_positions(gpt2, gpt2_ref, gpt2_texts, monkeypatch,
                                                    tmp_path):
    model, tokenizer = gpt2
    texts = dict(list(gpt2_texts.items())[:16])
    expected = gpt2_ref.expected(tokenizer, texts, context_size=20, overflow="chunk")
    seen = spy_forwards(monkeypatch)
    run = capture(model, tokenizer, list(texts.values()), GPT2_MODULES, tmp_path / "out",
                  context_size=20, overflow="chunk", packing="auto", max_batch_tokens=60)
    assert_packed(seen)
    check_capture(run, expected, GPT2_MODULES)


@pytest.fixture(scope="module")
def llama(gpt2):
    """A tiny Llama (random weights, GQA, RoPE) sharing the tiny GPT-2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = gpt2[1]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=256, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval(), tokenizer


LLAMA_MODULES = ["model.layers.1", "model.layers.0.self_attn", "model.layers.0"]


@pytest.mark.parametrize("packing", ["off", "auto"])
def test_llama_rows_equal_unpadded_forward(llama, gpt2_texts, packing, monkeypatch, tmp_path):
    model, tokenizer = llama
    expected = Reference(model, LLAMA_MODULES).expected(tokenizer, gpt2_texts, context_size=64,
                                                        overflow="truncate")
    seen = spy_forwards(monkeypatch)
    run = capture(model, tokenizer, list(gpt2_texts.values()), LLAMA_MODULES, tmp_path / "out",
                  context_size=64, packing=packing, batch_size=4)
    if packing == "auto":
        assert_packed(seen)
    check_capture(run, expected, LLAMA_MODULES)


def test_packing_auto_pads_for_other_architectures(minilm, monkeypatch, tmp_path):
    from crowstream.pipeline.packing import supports_packing

    assert not supports_packing(minilm[0])
    seen = spy_forwards(monkeypatch)
    capture(minilm[0], minilm[1], ["short one", "a longer document here"], ["encoder.layer.0"],
            tmp_path / "out", packing="auto")
    assert seen and not any(packed for _, _, packed in seen)


@pytest.mark.parametrize("pack", [False, True])
def test_pin_memory_pins_only_what_goes_to_the_gpu(gpt2, gpt2_texts, pack, monkeypatch):
    """Packed batches send their segment ids (the GPU builds the mask from them) and no
    attention mask; padded batches send theirs. Pinning is faked: no CUDA needed."""
    from crowstream.pipeline.batching import Tokenizing, shard_stream, Batch
    from crowstream.pipeline.options import CaptureConfig

    config = CaptureConfig(model="m", tokenizer="t", source="s", modules=("a",), context_size=64)
    rows = list(enumerate(list(gpt2_texts.values())[:12]))
    stream = shard_stream([(0, rows)], Tokenizing(gpt2[1], config, pack=pack), shard_size=12,
                          tokens_before=0)
    batch = next(item for item in stream if isinstance(item, Batch))
    assert (batch.segments is not None) == pack
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self: pinned.append(self) or self.clone(), raising=False)
    out = batch.pin_memory()
    sent = {name for name in ("input_ids", "keep_index", "attention_mask", "position_ids",
                              "segments")
            if getattr(batch, name) is not None and getattr(out, name) is not getattr(batch, name)}
    assert sent == ({"input_ids", "keep_index", "position_ids", "segments"} if pack
                    else {"input_ids", "keep_index", "attention_mask"})
    assert len(pinned) == len(sent)
