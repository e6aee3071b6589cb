"""Real model sizes on one machine: row groups of at most row_group_bytes whatever the
batch, part files that roll over within a shard, float16 that never overflows silently,
the in-flight byte budget, and big-model hygiene (eval mode, OOM retry, input device,
16-bit rows upcast on the host)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import weakref

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import crowstream as cs
from crowstream.pipeline import parts as writer_module
from crowstream.errors import Float16OverflowError
from crowstream.pipeline.flatten import to_record_batch
from crowstream.schemas import ROW_GROUP_BYTES, row_schema
from crowstream.pipeline.parts import PartWriter, ShardParts
from crowstream.pipeline.threads import EncoderPool
from helpers import assert_same_rows, manifest_of, read_rows

MODULES = ["transformer.h.0", "transformer.h.2"]


def _capture(gpt2, texts, out, **kwargs):
    model, tokenizer = gpt2
    kwargs.setdefault("progress", False)
    return cs.capture(model, texts, MODULES, str(out), tokenizer=tokenizer, **kwargs)


def _record_batch(n: int, d: int, dtype: str = "float32", seed: int = 0):
    vectors = np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)
    ids = np.arange(n)
    return to_record_batch(ids, ids.astype(np.int32), ids.astype(np.int32), vectors, dtype)


def _row_groups(path) -> list[tuple[int, int]]:
    meta = pq.ParquetFile(path).metadata
    return [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size)
            for g in range(meta.num_row_groups)]


# -- 1. row groups and part files --------------------------------------------------------

def test_a_batch_bigger_than_a_row_group_gives_several_row_groups(tmp_path):
    batch = _record_batch(10_000, 1024)  # 41 MB in one batch, 2.5 row groups
    assert batch.nbytes > 2 * ROW_GROUP_BYTES
    part = PartWriter(str(tmp_path / "part.parquet"), batch.schema)
    part.write(batch)
    assert part.buffered_bytes < ROW_GROUP_BYTES  # two full groups went out at once
    info = part.close()
    groups = _row_groups(info.tmp_path)
    assert len(groups) == 3 and info.rows == 10_000
    assert all(size <= ROW_GROUP_BYTES for _, size in groups), groups
    assert sum(rows for rows, _ in groups) == 10_000
    got = pq.read_table(info.tmp_path)["vector"].combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(got, batch["vector"].flatten().to_numpy())


def test_small_batches_fill_row_groups_and_are_copied(tmp_path):
    """Many small batches make full row groups; the writer keeps no reference to them."""
    schema = row_schema(1024, "float32")
    part = PartWriter(str(tmp_path / "part.parquet"), schema)
    batches = [_record_batch(700, 1024, seed=i) for i in range(12)]  # 8,400 rows
    for batch in batches:
        part.write(batch)
    refs = [weakref.ref(b) for b in batches]
    del batches, batch
    assert all(r() is None for r in refs)  # buffered rows are copies, not slices
    info = part.close()
    groups = _row_groups(info.tmp_path)
    assert [rows for rows, _ in groups] == [part.group_rows, part.group_rows,
                                            8_400 - 2 * part.group_rows]
    assert all(size <= ROW_GROUP_BYTES for _, size in groups)


def test_part_files_roll_over_at_row_group_boundaries(tmp_path):
    schema = row_schema(1024, "float32")
    target = 3 * ROW_GROUP_BYTES  # about three row groups per file
    pool = EncoderPool(2)
    parts = ShardParts(lambda seq: str(tmp_path / f"p-{seq:03d}.parquet"), schema, pool,
                       target_bytes=target)
    for i in range(5):
        parts.write(_record_batch(5_000, 1024, seed=i))
    infos = [future.result() for future in parts.close()]
    pool.close()
    assert [i.seq for i in infos] == list(range(len(infos))) and len(infos) >= 3
    assert [i.rows for i in infos[:-1]] == [parts.file_rows] * (len(infos) - 1)
    assert sum(i.rows for i in infos) == 25_000
    for info in infos:
        assert all(size <= ROW_GROUP_BYTES for _, size in _row_groups(info.tmp_path))


def test_capture_with_small_row_groups_and_files_stores_the_same_rows(gpt2, corpus, tmp_path,
                                                                      monkeypatch):
    texts = corpus[:30]
    reference = _capture(gpt2, texts, tmp_path / "reference", shard_size=12)
    monkeypatch.setattr(writer_module, "ROW_GROUP_BYTES", 32 << 10)  # ~120 rows at d=64
    monkeypatch.setattr(writer_module, "PART_TARGET_BYTES", 100 << 10)  # ~3 groups a file
    run = _capture(gpt2, texts, tmp_path / "small", shard_size=12, batch_size=16)
    assert_same_rows(run.path, reference.path)
    manifest = manifest_of(run.path)
    parts = [p for p in manifest.parts if p.kind == "module"]
    shard0 = sorted(p.path for p in manifest.shards[0].parts if p.module == MODULES[0])
    assert len(shard0) > 1 and shard0[1].endswith("-000000-001.parquet")
    for part in parts:
        groups = _row_groups(os.path.join(run.path, part.path))
        assert all(size <= 32 << 10 for _, size in groups)
    assert any(len(_row_groups(os.path.join(run.path, p.path))) > 1 for p in parts)
    assert cs.verify(run.path)["parts"] == len(manifest.parts)


# -- 2. float16 that never lies ----------------------------------------------------------

@pytest.fixture
def hot_gpt2(gpt2_dir, corpus):
    """The tiny GPT-2 with one token's embedding at 1e5: its positions overflow float16 in
    every block's output. The token is absent from the first 8 documents (the first two
    shards of 4), present in later ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    seen = {t for text in corpus[:8] for t in tokenizer(text, truncation=True, max_length=64)["input_ids"]}
    later = [t for text in corpus[8:30] for t in tokenizer(text, truncation=True, max_length=64)["input_ids"]]
    token = next(t for t in later if t not in seen)
    with torch.no_grad():
        model.transformer.wte.weight[token] = 1e5
    return model, tokenizer


def _json_files_are_strict(out) -> None:
    """No JSON file in OUT holds NaN or Infinity (not JSON for any non-Python reader)."""
    def refuse(constant):
        raise AssertionError(f"{constant} in a JSON file")

    files = glob.glob(os.path.join(out, "**", "*.json"), recursive=True)
    assert files
    for path in files:
        with open(path) as f:
            json.load(f, parse_constant=refuse)


def test_float16_overflow_fails_names_the_module_and_stays_resumable(hot_gpt2, corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Float16OverflowError, match=r"module 'transformer\.h\.0' has values of "
                       r"magnitude up to 1000\d\d,.*dtype='float32'.*float16_overflow='clamp'"):
        cs.capture(hot_gpt2[0], corpus[:30], ["transformer.h.0"], str(out), tokenizer=hot_gpt2[1],
                   dtype="float16", shard_size=4, batch_size=4, progress=False)
    failed = manifest_of(out)
    assert failed.status == "failed" and "Float16OverflowError" in failed.error
    assert len(failed.shards) == 2  # the shards before the overflow are committed
    _json_files_are_strict(out)

    with pytest.raises(cs.errors.ResumeMismatchError, match="float16_overflow"):  # not the reverse
        cs.capture(hot_gpt2[0], corpus[:30], ["transformer.h.0"], str(out), tokenizer=hot_gpt2[1],
                   dtype="float32", shard_size=4, batch_size=4, progress=False, resume=True)
    run = cs.capture(hot_gpt2[0], corpus[:30], ["transformer.h.0"], str(out), tokenizer=hot_gpt2[1],
                     dtype="float16", float16_overflow="clamp", shard_size=4, batch_size=4,
                     progress=False, resume=True)
    manifest = manifest_of(out)
    assert manifest.status == "complete"
    assert manifest.config["float16_overflow"] == "clamp"
    clamped = manifest.stats["transformer.h.0"].clamped
    assert clamped > 0
    *_, vectors = read_rows(out)["transformer.h.0"]
    assert vectors.dtype == np.float16 and np.isfinite(vectors).all()
    assert (np.abs(vectors) == np.float16(65504)).sum() == clamped
    # statistics describe the stored (clamped, float16) values
    stats = manifest.stats["transformer.h.0"]
    np.testing.assert_allclose(stats.mean, vectors.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    assert run.tokens["transformer.h.0"] == len(vectors)
    _json_files_are_strict(out)


def test_float16_clamp_from_the_start_matches_a_clamped_float32_run(hot_gpt2, corpus, tmp_path):
    model, tokenizer = hot_gpt2
    texts = corpus[:30]
    clamped = cs.capture(model, texts, ["transformer.h.0"], str(tmp_path / "fp16"),
                         tokenizer=tokenizer, dtype="float16", float16_overflow="clamp",
                         progress=False)
    wide = cs.capture(model, texts, ["transformer.h.0"], str(tmp_path / "fp32"),
                      tokenizer=tokenizer, progress=False)
    *keys16, got = read_rows(clamped.path)["transformer.h.0"]
    *keys32, want = read_rows(wide.path)["transformer.h.0"]
    for a, b in zip(keys16, keys32):
        np.testing.assert_array_equal(a, b)
    want16 = np.clip(want, -65504, 65504).astype(np.float16)
    assert np.array_equal(got, want16) or np.abs(got.astype(np.float32) - want16).max() <= 0.01
    assert manifest_of(clamped.path).stats["transformer.h.0"].clamped == int(
        (np.abs(want) > 65504).sum())
    assert np.isfinite(got).all()


def test_float16_without_overflow_records_no_clamping(gpt2, corpus, tmp_path):
    run = _capture(gpt2, corpus[:10], tmp_path / "out", dtype="float16")
    manifest = manifest_of(run.path)
    assert manifest.config["float16_overflow"] == "error"
    assert manifest.stats["transformer.h.0"].clamped == 0
    _json_files_are_strict(run.path)


# -- 3. big-model hygiene ------------------------------------------------------------------

@pytest.fixture
def fresh_gpt2(gpt2_dir):
    """A private copy of the tiny GPT-2 that a test may change (dropout 0.1 everywhere)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(gpt2_dir), AutoTokenizer.from_pretrained(gpt2_dir)


def test_a_model_in_train_mode_is_captured_in_eval_mode_and_given_back_in_train(
        gpt2, fresh_gpt2, corpus, tmp_path):
    model, tokenizer = fresh_gpt2
    assert model.config.resid_pdrop > 0
    model.train()
    model.transformer.h[1].eval()  # a submodule's own mode is given back as well
    reference = _capture(gpt2, corpus[:12], tmp_path / "eval")
    run = cs.capture(model, corpus[:12], MODULES, str(tmp_path / "train"), tokenizer=tokenizer,
                     progress=False)
    assert_same_rows(run.path, reference.path)  # bit-identical: dropout was off
    assert model.training and model.transformer.h[0].training and model.transformer.h[0].attn.training
    assert not model.transformer.h[1].training and not model.transformer.h[1].mlp.training


def test_train_mode_is_given_back_after_an_error(fresh_gpt2, corpus, tmp_path):
    model, tokenizer = fresh_gpt2
    model.train()
    calls = []

    def fail_on_the_second_batch(module, args, output):
        calls.append(module.training)
        if len(calls) == 3:  # the probe, the first batch, then this one
            raise ValueError("boom")

    handle = model.transformer.h[0].register_forward_hook(fail_on_the_second_batch)
    try:
        with pytest.raises(ValueError, match="boom"):
            cs.capture(model, corpus[:12], MODULES, str(tmp_path / "out"), tokenizer=tokenizer,
                       batch_size=4, progress=False)
    finally:
        handle.remove()
    assert calls == [False, False, False]  # every forward ran in eval mode
    assert all(m.training for m in model.modules())


def test_the_oom_retry_runs_after_the_failed_batch_is_freed(gpt2, fresh_gpt2, corpus, tmp_path, caplog):
    model, tokenizer = fresh_gpt2
    model.eval()
    seen = {"calls": 0, "failed_input": None, "alive_at_retry": None}

    def simulate_oom_once(module, args):
        seen["calls"] += 1
        if seen["calls"] == 2:  # the first batch (call 1 is the probe)
            seen["failed_input"] = weakref.ref(args[0])  # a tensor of the failed forward
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        if seen["calls"] == 3:
            seen["alive_at_retry"] = seen["failed_input"]() is not None

    handle = model.transformer.h[1].register_forward_pre_hook(simulate_oom_once)
    try:
        run = cs.capture(model, corpus[:12], MODULES, str(tmp_path / "out"), tokenizer=tokenizer,
                         batch_size=8, progress=False)
    finally:
        handle.remove()
    assert seen["alive_at_retry"] is False, "the failed forward's tensors were still alive"
    assert "out of memory at a batch of" in caplog.text and "capping forwards at" in caplog.text
    reference = _capture(gpt2, corpus[:12], tmp_path / "reference")
    assert_same_rows(run.path, reference.path, atol=1e-5)  # other batch shapes: ulps differ


def test_the_input_device_comes_from_the_embeddings_not_the_first_parameter(
        gpt2, fresh_gpt2, corpus, tmp_path):
    """As with device_map: the first parameter sits on 'meta' (offloaded), the embeddings
    on the CPU. Taking the first parameter's device sent the input ids to 'meta'."""
    from crowstream.pipeline.probe import input_device

    model, tokenizer = fresh_gpt2
    model.eval()
    offloaded = torch.nn.Linear(4, 4, device="meta")
    model.transformer._modules = {"offloaded": offloaded, **model.transformer._modules}
    assert next(model.parameters()).device.type == "meta"
    assert input_device(model) == torch.device("cpu")
    run = cs.capture(model, corpus[:12], MODULES, str(tmp_path / "out"), tokenizer=tokenizer,
                     progress=False)
    reference = _capture(gpt2, corpus[:12], tmp_path / "reference")
    assert_same_rows(run.path, reference.path)


def test_an_offloaded_embedding_executes_where_its_hook_says(fresh_gpt2):
    """accelerate's offload keeps weights on 'meta' and names the execution device in a hook."""
    from types import SimpleNamespace

    from crowstream.pipeline.probe import input_device

    model, _ = fresh_gpt2
    embeddings = torch.nn.Embedding(8, 4, device="meta")
    embeddings._hf_hook = SimpleNamespace(execution_device=0)
    model.set_input_embeddings(embeddings)
    assert input_device(model) == torch.device("cuda:0")


def test_bf16_rows_travel_in_bf16_and_are_upcast_on_the_host(fresh_gpt2, corpus, tmp_path):
    from crowstream.pipeline.batching import Tokenizing, shard_stream
    from crowstream.pipeline.options import CaptureConfig
    from crowstream.pipeline.tracing import ModelTracer

    model, tokenizer = fresh_gpt2
    model.eval().to(torch.bfloat16)
    tracer = ModelTracer(model, tokenizer, MODULES, "float32")
    config = CaptureConfig(model={}, tokenizer={}, source={}, modules=tuple(MODULES), context_size=64)
    stream = shard_stream([(0, list(enumerate(corpus[:4])))], Tokenizing(tokenizer, config),
                          shard_size=4, tokens_before=0)
    with tracer:
        captured = tracer.run(next(stream))
    assert {v.dtype for v in captured.vectors.values()} == {torch.bfloat16}
    assert captured.rows(MODULES[0], torch.float32).dtype == np.float32

    run = cs.capture(model, corpus[:12], MODULES, str(tmp_path / "out"), tokenizer=tokenizer,
                     progress=False)
    for module in MODULES:
        *_, vectors = read_rows(run.path)[module]
        assert vectors.dtype == np.float32
        assert not (vectors.view(np.uint32) & 0xFFFF).any()  # exactly bf16 values, upcast


def test_revision_is_passed_to_the_hub_and_recorded(gpt2_dir, corpus, tmp_path, monkeypatch, gpt2):
    import transformers

    asked = []
    original = transformers.AutoConfig.from_pretrained

    def spy(name, *args, **kwargs):
        asked.append(kwargs.get("revision"))
        return original(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    run = cs.capture(gpt2_dir, corpus[:4], MODULES, str(tmp_path / "out"), revision="step1000",
                     progress=False)
    assert asked and set(asked) == {"step1000"}
    assert manifest_of(run.path).config["model"]["revision"] == "step1000"
    with pytest.raises(cs.errors.ConfigError, match="revision='step1000' only applies"):
        cs.capture(gpt2[0], corpus[:4], MODULES, str(tmp_path / "other"), tokenizer=gpt2[1],
                   revision="step1000", progress=False)


# -- 4. one in-flight byte budget --------------------------------------------------------

def test_the_budget_makes_the_forward_wait_and_admits_an_oversized_batch_alone():
    import threading
    import time

    from crowstream.pipeline.threads import ByteBudget

    budget = ByteBudget(100)
    budget.acquire(60)
    admitted = threading.Event()
    waiter = threading.Thread(target=lambda: (budget.acquire(60), admitted.set()))
    waiter.start()
    deadline = time.monotonic() + 10
    while not budget._changed._waiters:  # poll until the waiter is blocked in acquire
        assert time.monotonic() < deadline, "the second acquire never waited"
        time.sleep(0.001)
    assert not admitted.is_set()  # 120 > 100: waits
    budget.settle(60, resident_change=10)  # written; 10 bytes stay in a row-group buffer
    waiter.join(2)
    assert admitted.is_set() and budget.used == 70
    budget.settle(60)
    budget.acquire(500)  # larger than the whole budget, but nothing else is in flight
    assert budget.used == 510 and budget.peak == 510


def test_a_failed_writer_stops_a_waiting_forward():
    from crowstream.pipeline.threads import ByteBudget

    budget = ByteBudget(100)
    budget.acquire(80)

    def check():
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        budget.acquire(80, check=check)


@pytest.fixture
def budgets(monkeypatch):
    """Every ByteBudget a capture creates."""
    from crowstream.pipeline import threads as _threads

    made = []
    original = _threads.ByteBudget.__init__

    def record(self, limit):
        original(self, limit)
        made.append(self)

    monkeypatch.setattr(_threads.ByteBudget, "__init__", record)
    return made


@pytest.mark.parametrize("limit", [1, 40_000, 1 << 30])
def test_capture_stays_within_the_budget_and_stores_the_same_rows(gpt2, corpus, tmp_path, limit,
                                                                  budgets, monkeypatch):
    monkeypatch.setattr(writer_module, "ROW_GROUP_BYTES", 32 << 10)  # buffers matter too
    reference = _capture(gpt2, corpus[:30], tmp_path / "reference", shard_size=10, batch_size=8)
    budgets.clear()
    from crowstream.pipeline.parts import (ENCODER_BYTES, encoder_slots, lead_bytes,
                                           min_inflight_bytes)

    least = min_inflight_bytes(len(MODULES))  # one encoder + two row-group buffers a module
    with pytest.warns(UserWarning, match=rf"max_inflight_bytes={limit:,} is below the "
                                         rf"{least:,} bytes .* using {least:,}") \
            if limit < least else contextlib.nullcontext():
        run = _capture(gpt2, corpus[:30], tmp_path / "out", shard_size=10, batch_size=8,
                       max_inflight_bytes=limit)
    assert_same_rows(run.path, reference.path)
    honoured = max(limit, least)
    assert manifest_of(run.path).config["max_inflight_bytes"] == honoured
    (budget,) = budgets  # the rows' share: concurrent encoders take theirs first
    slots = encoder_slots(honoured)
    row_bytes = 2 * (16 + 64 * 4)
    # and the forward runs at most one part file per encoder and module, or two batches
    # of the default token budget, ahead of them
    lead = lead_bytes(slots, len(MODULES), 8192 * row_bytes)
    assert lead == max(lead_bytes(slots, len(MODULES)), 2 * 8192 * row_bytes)
    assert lead_bytes(slots, len(MODULES)) == slots * len(MODULES) * 4 * (32 << 10)  # one file
    assert budget.limit == max(1, min(honoured - slots * ENCODER_BYTES, lead))
    if limit == 1 << 30:
        assert budget.limit == lead < honoured // 4
    assert budget.used == 0  # everything written and handed back
    biggest_batch = 8 * 64 * row_bytes
    resident = 2 * 2 * (32 << 10)  # at most two row groups per module stay buffered
    assert budget.peak <= max(budget.limit, biggest_batch) + resident
    if limit == 40_000:
        assert budget.peak > budget.limit  # row-group buffers and oversized batches count


def test_default_budget_is_min_2gib_or_a_tenth_of_ram(gpt2, corpus, tmp_path, budgets):
    from crowstream.pipeline.options import default_inflight_bytes
    from crowstream.pipeline.parts import ENCODER_BYTES, encoder_slots, lead_bytes

    run = _capture(gpt2, corpus[:4], tmp_path / "out")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    default = default_inflight_bytes()
    assert default == min(2 << 30, int(ram / 10))
    assert manifest_of(run.path).config["max_inflight_bytes"] == default
    slots = encoder_slots(default)
    lead = lead_bytes(slots, len(MODULES), 8192 * 2 * (16 + 64 * 4))
    assert budgets[0].limit == min(default - slots * ENCODER_BYTES, lead)


@pytest.mark.parametrize("cpus, local, want", [
    (16, None, 16), (16, "", 16), (16, "4", 4), (16, "32", 1), (16, "0", 16), (2, "2", 1)])
def test_encoder_threads_default_to_this_ranks_share_of_the_cpus(monkeypatch, cpus, local, want):
    """By default each process encodes on its share of the node's CPUs: torchrun's
    LOCAL_WORLD_SIZE ranks split them (8 ranks on a 64-core node: 8 encoders each, not 64);
    without it one per CPU. The budget's cap still applies; an explicit `encoder_threads`
    wins."""
    from crowstream.pipeline import parts
    from crowstream.pipeline.parts import encoder_slots

    monkeypatch.setattr(parts, "usable_cpus", lambda: cpus)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert encoder_slots(1 << 40) == want
    assert encoder_slots(1 << 40, threads=3) == 3


def test_a_local_world_size_that_is_no_number_is_one_clear_error(monkeypatch):
    """As RANK and WORLD_SIZE: a broken LOCAL_WORLD_SIZE is named, not guessed around."""
    from crowstream.errors import ConfigError
    from crowstream.pipeline.parts import encoder_slots

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "many")
    with pytest.raises(ConfigError, match="LOCAL_WORLD_SIZE='many' is not an integer"):
        encoder_slots(1 << 40)


def test_cli_takes_the_new_options():
    from crowstream.cli import build_parser

    args = build_parser().parse_args(
        ["capture", "m", "d", "-m", "x", "-o", "o", "--max-inflight-bytes", "512M",
         "--float16-overflow", "clamp", "--revision", "step1000"])
    assert (args.max_inflight_bytes, args.float16_overflow, args.revision) == (512 << 20, "clamp", "step1000")
    assert build_parser().parse_args(["capture", "m", "d", "-m", "x", "-o", "o"]).max_batch_tokens == 8192
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["capture", "m", "d", "-m", "x", "-o", "o", "--max-inflight-bytes", "lots"])
    assert exited.value.code == 2  # argparse's usage error


# -- 5. shards sized in tokens, batches that reach batch_size -----------------------------

def test_default_shards_are_sized_in_tokens_whatever_d(gpt2, corpus, tmp_path):
    from crowstream.pipeline.options import SHARD_TARGET_TOKENS

    model, tokenizer = gpt2
    run = _capture(gpt2, corpus[:20], tmp_path / "out")
    lengths = [len(tokenizer(t, truncation=True, max_length=64)["input_ids"]) for t in corpus[:20]]
    assert run.manifest.shard_size == int(SHARD_TARGET_TOKENS / np.mean(lengths))
    assert run.manifest.config["max_batch_tokens"] == 8192


def test_batches_reach_batch_size_when_the_token_budget_allows(gpt2, corpus):
    from crowstream.pipeline.batching import Batch, Tokenizing, estimate_shard_size, shard_stream
    from crowstream.pipeline.options import CaptureConfig

    tokenizer = gpt2[1]
    config = CaptureConfig(model={}, tokenizer={}, source={}, modules=("x",), context_size=64)
    tokenizing = Tokenizing(tokenizer, config)
    shard_size = estimate_shard_size(corpus[:100], tokenizing)
    assert shard_size > 100  # a shard holds many batches, so sorting windows fill batches
    items = list(shard_stream([(0, list(enumerate(corpus[:100])))], tokenizing,
                              shard_size=shard_size, tokens_before=0))
    sizes = [item.n_pieces for item in items if isinstance(item, Batch)]
    assert sizes[:-1] == [32] * (len(sizes) - 1) and sum(sizes) == 100


def test_resume_with_rolled_part_files_is_bit_identical(gpt2_dir, gpt2, corpus, tmp_path,
                                                         monkeypatch):
    """A run that fails mid-shard, resumed, equals an uninterrupted run byte for byte, also
    when shards hold several part files per module and part files many row groups."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(writer_module, "ROW_GROUP_BYTES", 32 << 10)
    monkeypatch.setattr(writer_module, "PART_TARGET_BYTES", 100 << 10)
    options = dict(shard_size=10, batch_size=4, progress=False)
    reference = _capture(gpt2, corpus[:30], tmp_path / "reference", **options)

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    calls = []

    def fail_in_the_second_shard(module, args):
        calls.append(1)
        if len(calls) == 6:  # the probe, 3 batches of shard 0, then the 2nd of shard 1
            raise ValueError("crash")

    handle = model.transformer.h[0].register_forward_pre_hook(fail_in_the_second_shard)
    with pytest.raises(ValueError, match="crash"):
        cs.capture(model, corpus[:30], MODULES, str(tmp_path / "out"), tokenizer=gpt2[1], **options)
    handle.remove()
    assert len(manifest_of(tmp_path / "out").shards) == 1
    cs.capture(model, corpus[:30], MODULES, str(tmp_path / "out"), tokenizer=gpt2[1], resume=True,
               **options)
    assert_same_rows(tmp_path / "out", reference.path)
    got = {p.path: p.sha256 for p in manifest_of(tmp_path / "out").parts}
    want = {p.path: p.sha256 for p in manifest_of(reference.path).parts}
    assert got == want and any(path.endswith("-001.parquet") for path in got)


def test_the_host_pool_reuses_buffers_within_its_capacity():
    """The CUDA path's host buffers, with plain CPU memory standing in for pinned memory."""
    from crowstream.pipeline.host import HostPool

    allocated = []

    def allocate(n):
        allocated.append(n)
        return torch.empty(n, dtype=torch.uint8)

    pool = HostPool(capacity=3 << 20, allocate=allocate)
    rows, buffer = pool.take((1000, 256), torch.float32)  # 1,024,000 bytes
    assert rows.shape == (1000, 256) and rows.dtype == torch.float32
    assert 1_024_000 <= buffer.numel() <= 1_024_000 * 9 // 8 and len(allocated) == 1
    pool.give(buffer)
    again, reused = pool.take((900, 256), torch.float32)  # fits the free buffer: reused
    assert reused is buffer and len(allocated) == 1 and again.shape == (900, 256)
    _, small = pool.take((10, 256), torch.bfloat16)  # far smaller: not served by a big one
    assert small is not buffer and len(allocated) == 2
    pool.give(reused)
    _, big = pool.take((4000, 256), torch.float32)  # 4 MB: over the free capacity once given
    pool.give(big)
    assert sum(b.numel() for b in pool._free) <= 3 << 20


def test_cpu_captures_select_rows_into_reused_host_buffers(gpt2, corpus, tmp_path, monkeypatch):
    """On the CPU kept rows are selected straight into pooled buffers (a fresh [N, d]
    tensor per batch costs more in page faults than the copy): over 12 batches x 2
    modules only a few buffers are ever allocated, and the rows are those of a capture
    that allocates a fresh buffer each time. (A batch that keeps every position stores
    the deepest module's rows from the forward's own tensor: no buffer at all.)"""
    from crowstream.pipeline import host
    from crowstream.pipeline.tracing import ModelTracer

    allocated, taken, borrowed = [], [], []
    take, select = host.HostPool.take, ModelTracer._select

    def counting(n):
        allocated.append(n)
        return torch.empty(n, dtype=torch.uint8)

    model, tokenizer = gpt2
    monkeypatch.setattr(host, "_host_bytes", counting)
    monkeypatch.setattr(host.HostPool, "take",
                        lambda self, *args: taken.append(args) or take(self, *args))
    def spy(self, *args):
        rows = select(self, *args)
        borrowed.append(rows.buffer is None)
        return rows

    monkeypatch.setattr(ModelTracer, "_select", spy)
    pooled = cs.capture(model, corpus[:48], MODULES, str(tmp_path / "pooled"),
                        tokenizer=tokenizer, batch_size=4, progress=False, packing="off")
    assert len(borrowed) == 24  # 12 batches x 2 modules
    assert len(taken) == 24 - sum(borrowed)  # every other batch's rows went through the pool
    assert 2 <= len(allocated) <= len(taken) // 3  # reused, not one buffer per batch
    monkeypatch.setattr(host.HostPool, "give", lambda self, buffer: None)  # no reuse
    fresh = cs.capture(model, corpus[:48], MODULES, str(tmp_path / "fresh"),
                       tokenizer=tokenizer, batch_size=4, progress=False, packing="off")
    assert_same_rows(pooled.path, fresh.path)


def test_the_documented_budget_floor_and_oom_recovery():
    """The figures docs/performance.md states: the smallest budget the writers honour (one
    encoder + two row groups per module) and the clean forwards before the OOM cap doubles."""
    from crowstream.pipeline import session
    from crowstream.pipeline.parts import min_inflight_bytes

    assert min_inflight_bytes(1) == 80 << 20 and min_inflight_bytes(11) == 400 << 20
    assert session.OOM_RECOVERY_BATCHES == 50


@pytest.mark.parametrize("source", ["float32", "bfloat16"])
@pytest.mark.parametrize("clamp", [False, True])
def test_float16_rows_are_selected_checked_and_cast_block_by_block(monkeypatch, source, clamp):
    """The CPU cast works a block of rows at a time: the rows, in order, the peak (NaN
    ignored, the largest magnitude in any block) and the clamped count equal those of one
    whole-array pass, as a device makes them."""
    import types

    import torch

    from crowstream.pipeline import tracing
    from crowstream.pipeline.host import HostPool

    monkeypatch.setattr(tracing, "CAST_BLOCK_BYTES", 7 * 16 * 4)  # 7 rows of d = 16 float32
    flat = torch.randn(100, 16).to(getattr(torch, source))
    flat[83, 5] = -70000.0  # the peak, in a late block
    flat[40, 1] = 66000.0
    flat[13, 0] = float("nan")  # kept (row 12 is dropped)
    index = torch.tensor([i for i in range(100) if i % 3])  # every third row dropped
    owner = types.SimpleNamespace(pool=HostPool.for_device(1 << 20, False))
    rows, peak, count = tracing.ModelTracer._select_cast(owner, flat, index, torch.float16, clamp)
    expected, whole_peak, whole_count = tracing._stored(flat.index_select(0, index),
                                                        torch.float16, clamp)
    assert rows.tensor.dtype == torch.float16 and rows.tensor.shape == expected.shape
    assert torch.isnan(rows.tensor).sum() == 1
    assert torch.equal(rows.tensor.view(torch.int16), expected.to(torch.float16).view(torch.int16))
    if clamp:
        assert peak is None and int(count) == int(whole_count) == 2
        assert float(rows.tensor.float().nan_to_num().abs().max()) == 65504.0
    else:
        assert count is None
        assert float(peak) == float(whole_peak) == float(flat[83, 5].abs())  # bf16: 70,144
