"""The nine defects found reading the hot path (issue 15), a regression test each: float16
clamping, NaN and negative overflow; modules that keep batch size 1; numpy integers as
options; rows on a non-CUDA accelerator; no thread leaked by an error before the loop; no
closed part left in `.tmp/` by a failed commit (and the directories fsynced); a writer
failure noticed before the next forward. Checked against the code before each fix: 1, 2, 4,
6, 8 and 9 fail there; 5 and 7 were fixed earlier in the 0.3 refactor; 3 fails when `abs()`
is removed from the overflow check."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import types

import numpy as np
import pytest
import torch

import crowstream as cs
from crowstream import errors
from crowstream.pipeline.host import Rows, on_cpu
from crowstream.pipeline.tracing import ModelTracer
from crowstream.pipeline.writers import Writers
from helpers import manifest_of, patch_everywhere, read_rows

MODULE = "transformer.wte"  # the embedding: a token's row is exactly what we set
KW = dict(shard_size=4, batch_size=4, progress=False)
N = 12


def hot_model(gpt2_dir, corpus, values, dtype=torch.float32):
    """The tiny GPT-2 (in `dtype`) with the embedding of a token of the first document set
    to `values` ([d] or a scalar); -> (model, tokenizer, times the token occurs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, torch_dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    ids = [tokenizer(text, truncation=True, max_length=64)["input_ids"] for text in corpus[:N]]
    token = ids[0][0]
    with torch.no_grad():
        model.transformer.wte.weight[token] = torch.as_tensor(values, dtype=torch.float32).to(dtype)
    return model, tokenizer, sum(row.count(token) for row in ids)


def run(model, tokenizer, corpus, out, **kw):
    return cs.capture(model, corpus[:N], [MODULE], str(out), tokenizer=tokenizer, **{**KW, **kw})


def strict_json(path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{constant} in {path}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# 1. bf16 + float16 + clamp -------------------------------------------------------------------

def test_bf16_model_clamped_to_float16_stores_65504_not_inf(gpt2_dir, corpus, tmp_path):
    values = torch.full((64,), 1e5)
    values[32:] = -1e5  # both signs
    model, tokenizer, hits = hot_model(gpt2_dir, corpus, values, torch.bfloat16)
    run(model, tokenizer, corpus, tmp_path / "out", dtype="float16", float16_overflow="clamp")
    *_, vectors = read_rows(str(tmp_path / "out"))[MODULE]
    assert np.isfinite(vectors).all()  # 0.2 clamped in bf16: 65504 -> 65536 -> inf
    assert (vectors == np.float16(65504)).sum() == 32 * hits
    assert (vectors == np.float16(-65504)).sum() == 32 * hits
    stats = manifest_of(tmp_path / "out").stats[MODULE]
    assert (stats.clamped, stats.nonfinite) == (64 * hits, 0)


# 2. NaN with float16 storage -----------------------------------------------------------------

def test_nan_stored_as_float16_is_counted_non_finite_not_an_overflow(gpt2_dir, corpus, tmp_path):
    values = torch.zeros(64)
    values[0] = float("nan")
    model, tokenizer, hits = hot_model(gpt2_dir, corpus, values)
    run(model, tokenizer, corpus, tmp_path / "out", dtype="float16")
    *_, vectors = read_rows(str(tmp_path / "out"))[MODULE]
    assert np.isnan(vectors).sum() == hits
    assert manifest_of(tmp_path / "out").stats[MODULE].nonfinite == hits
    strict_json(tmp_path / "out" / "crowstream.json")


def test_nan_does_not_hide_an_overflow_beside_it(gpt2_dir, corpus, tmp_path):
    values = torch.zeros(64)
    values[0], values[1] = float("nan"), 1e5  # amax alone would answer NaN
    model, tokenizer, _ = hot_model(gpt2_dir, corpus, values)
    with pytest.raises(errors.Float16OverflowError, match=r"magnitude up to 100000,"):
        run(model, tokenizer, corpus, tmp_path / "out", dtype="float16")


# 3. a negative overflow ----------------------------------------------------------------------

def test_negative_float16_overflow_is_refused_and_clamped(gpt2_dir, corpus, tmp_path):
    model, tokenizer, hits = hot_model(gpt2_dir, corpus, -1e5)
    with pytest.raises(errors.Float16OverflowError,
                       match=rf"^module '{MODULE}' has values of magnitude up to 100000, beyond"):
        run(model, tokenizer, corpus, tmp_path / "error", dtype="float16")
    run(model, tokenizer, corpus, tmp_path / "clamp", dtype="float16", float16_overflow="clamp")
    *_, vectors = read_rows(str(tmp_path / "clamp"))[MODULE]
    assert (vectors == np.float16(-65504)).sum() == 64 * hits and vectors.max() < 65504


# 4. modules whose output keeps batch size 1 --------------------------------------------------

def test_module_shared_by_the_batch_is_refused_before_anything_is_written(gpt2, tmp_path):
    model, tokenizer = gpt2
    with pytest.raises(errors.ModuleOutputError,
                       match=r"^module 'transformer\.wpe' returns \(1, \d+, 64\) for a batch of 2 "
                             r"sequences: one row shared by the whole batch"):
        cs.capture(model, ["one doc", "another doc"], "transformer.wpe", str(tmp_path / "out"),
                   tokenizer=tokenizer, progress=False)
    assert os.listdir(tmp_path) == []
    listing = {name: shape for name, _, shape in cs.modules(model, tokenizer=tokenizer)}
    assert isinstance(listing["transformer.wpe"], str) and "not one vector per token" in \
        listing["transformer.wpe"]
    assert isinstance(listing["transformer.wte"], tuple)


# 5. numpy integers as options ----------------------------------------------------------------

def test_numpy_integers_are_accepted_and_the_manifest_is_json(gpt2, corpus, tmp_path):
    model, tokenizer = gpt2
    excluded = tokenizer(corpus[0])["input_ids"][:2]
    result = cs.capture(model, corpus[:6], [MODULE], str(tmp_path / "out"), tokenizer=tokenizer,
                        context_size=np.int64(32), batch_size=np.int32(4),
                        shard_size=np.int64(3), max_docs=np.uint16(6),
                        exclude_token_ids=[np.int64(t) for t in excluded], progress=False)
    manifest = strict_json(tmp_path / "out" / "crowstream.json")
    assert manifest["status"] == "complete" and manifest["config"]["context_size"] == 32
    assert manifest["config"]["exclude_token_ids"] == excluded
    _, _, tokens, _ = read_rows(result.path)[MODULE]
    assert not np.isin(tokens, excluded).any()


# 6. rows on a non-CUDA accelerator -----------------------------------------------------------

class _OnAccelerator:
    """Stands for a tensor on an MPS/XPU device: `.numpy()` would fail, `.cpu()` copies."""

    device = types.SimpleNamespace(type="xpu")

    def __init__(self, value):
        self.value = value

    def cpu(self):
        return self.value


def test_rows_on_another_accelerator_are_copied_to_the_cpu():
    rows, scalar = torch.ones(3, 2), torch.tensor(7)
    moved = on_cpu({"a": _OnAccelerator(rows), "b": scalar})
    assert moved["a"] is rows and moved["b"] is scalar  # on the CPU already: not copied
    assert moved["a"].numpy().shape == (3, 2)


# 7. an error before the loop -----------------------------------------------------------------

def test_error_before_the_loop_leaks_no_thread_and_marks_the_run_failed(
        gpt2, corpus, tmp_path, monkeypatch):
    model, tokenizer = gpt2

    def broken(self):
        raise RuntimeError("nnsight could not wrap the model")

    before = threading.active_count()
    monkeypatch.setattr(ModelTracer, "__enter__", broken)
    with pytest.raises(RuntimeError, match="could not wrap"):
        run(model, tokenizer, corpus, tmp_path / "out")
    assert threading.active_count() == before
    assert manifest_of(tmp_path / "out").status == "failed"


# 8. a failed commit leaves nothing closed in .tmp/; .tmp/ and tokenizer/ are fsynced --------

def test_failed_commit_leaves_no_closed_part_in_tmp(gpt2, corpus, tmp_path, monkeypatch):
    from crowstream.format.records import write_record_json

    model, tokenizer = gpt2
    calls = []

    def full_on_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_record_json(*args)

    patch_everywhere(monkeypatch, write_record_json, full_on_second)
    out = tmp_path / "out"
    with pytest.raises(errors.OutputError, match="^disk full"):
        cs.capture(model, corpus[:N], [MODULE, "transformer.h.0"], str(out),
                   tokenizer=tokenizer, **KW)
    assert len(manifest_of(out).shards) == 1
    assert os.listdir(out / ".tmp") == []  # 0.2 left the failed shard's closed parts here
    monkeypatch.undo()
    cs.capture(model, corpus[:N], [MODULE, "transformer.h.0"], str(out), tokenizer=tokenizer,
               resume=True, **KW)
    assert manifest_of(out).status == "complete"


def test_tmp_and_tokenizer_directories_are_fsynced(gpt2, corpus, tmp_path, monkeypatch):
    from crowstream.format.files import fsync_dir

    synced = []

    def record(path):
        synced.append(os.path.normpath(path))
        fsync_dir(path)

    import crowstream.pipeline.run  # noqa: F401  (every module that binds it is imported)

    patch_everywhere(monkeypatch, fsync_dir, record)
    model, tokenizer = gpt2
    run(model, tokenizer, corpus, tmp_path / "out")
    out = tmp_path / "out"
    assert {str(out / ".tmp"), str(out / "tokenizer"), str(out)} <= set(synced)


# 9. a writer failure is noticed before the next forward -------------------------------------

def test_writer_failure_is_raised_before_another_forward(gpt2, corpus, tmp_path, monkeypatch):
    model, tokenizer = gpt2
    forwards = []
    real_run, real_admit = ModelTracer.run, Writers.admit

    def counted(self, batch):
        forwards.append(len(batch.keep_index))
        return real_run(self, batch)

    def failing(self, *args):
        raise RuntimeError("encoder crashed")

    def admit(self, batch):
        if forwards:  # let the first batch's write fail on its thread before admitting
            deadline = time.monotonic() + 10
            while not any(w._error for w in self.workers.values()) and time.monotonic() < deadline:
                time.sleep(0.005)
        return real_admit(self, batch)

    monkeypatch.setattr(ModelTracer, "run", counted)
    monkeypatch.setattr(Writers, "_write_rows", failing)
    monkeypatch.setattr(Writers, "admit", admit)
    with pytest.raises(RuntimeError, match=r"crowstream-writer\[transformer\.wte\] failed: "
                                           r"encoder crashed"):
        run(model, tokenizer, corpus, tmp_path / "out", shard_size=N, batch_size=2)
    assert len(forwards) == 1  # 0.2 ran one more forward before noticing


# the forward stops after the deepest module asked for, the shape probe included -----------

@pytest.mark.parametrize("modules", [["transformer.h.0"], ["transformer.wte", "transformer.h.0.mlp"],
                                     ["transformer.h.0.mlp:input"]])
def test_no_forward_runs_past_the_deepest_module_not_even_the_probe(gpt2, corpus, tmp_path,
                                                                    modules):
    model, tokenizer = gpt2
    deeper = []
    handles = [model.transformer.h[1].register_forward_pre_hook(lambda *a: deeper.append("h.1")),
               model.lm_head.register_forward_pre_hook(lambda *a: deeper.append("lm_head"))]
    try:
        run_ = cs.capture(model, corpus[:N], modules, str(tmp_path / "out"),
                          tokenizer=tokenizer, **KW)
    finally:
        for handle in handles:
            handle.remove()
    assert all(n > 0 for n in run_.manifest.counts.rows.values())
    assert deeper == []


# a CPU forward on every core holds the writers back ------------------------------------------

def test_the_gate_holds_writer_and_encoder_calls_until_the_forward_ends():
    from crowstream.pipeline.threads import EncoderPool, ForwardGate, Worker

    gate = ForwardGate()
    worker, pool = Worker("crowstream-test", gate=gate), EncoderPool(2, gate=gate)
    try:
        with gate.forward():
            futures = [worker.submit(time.monotonic), pool.lane().submit(time.monotonic)]
            time.sleep(0.2)
            assert not any(f.done() for f in futures)
            released = time.monotonic()
        assert all(f.result(timeout=10) >= released for f in futures)
    finally:
        worker.close()
        pool.close()


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch's native backend has one thread count per process")
@pytest.mark.parametrize("kind", ["worker", "encoder", "prefetch"])
def test_each_background_thread_runs_torch_on_one_thread_and_leaves_the_default(kind):
    """A background thread's torch calls run on it alone; meanwhile the caller's thread
    keeps its count, and a thread that first calls torch while it runs (a second capture
    started from a new thread, a user's worker) gets the process default, not 1."""
    from crowstream.pipeline.threads import EncoderPool, Worker, prefetch

    def fresh_thread_count():
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]

    def counts_then_fresh():
        return torch.get_num_threads(), fresh_thread_count()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if kind == "prefetch":
            seen = list(prefetch(counts_then_fresh() for _ in range(2)))
        else:
            runner = Worker("crowstream-test") if kind == "worker" else EncoderPool(2)
            submit = runner.submit if kind == "worker" else runner.lane().submit
            seen = [submit(counts_then_fresh).result(timeout=10) for _ in range(2)]
            runner.close()
        caller = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == [(1, 2), (1, 2)] and caller == 2


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch's native backend has one thread count per process")
def test_background_torch_runs_on_one_thread_and_the_forward_keeps_its_own(
        gpt2, corpus, tmp_path, monkeypatch):
    """Statistics and casts on the writer threads run torch on one thread each (each
    thread's own OpenMP team would spin on the forward's cores); the forward's thread keeps
    its count during the capture and after it, and a thread started later gets it too."""
    from crowstream.format import statistics
    from crowstream.pipeline import host

    model, tokenizer = gpt2
    seen: dict = {}

    def recording(method):
        def recorded(self, *args, **kwargs):
            seen.setdefault(threading.current_thread().name, set()).add(torch.get_num_threads())
            return method(self, *args, **kwargs)
        return recorded

    monkeypatch.setattr(statistics.ModuleStats, "update", recording(statistics.ModuleStats.update))
    monkeypatch.setattr(host.Captured, "rows", recording(host.Captured.rows))
    forward: list = []
    hook = model.transformer.h[0].register_forward_hook(
        lambda *args: forward.append(torch.get_num_threads()))
    before, later = torch.get_num_threads(), []
    torch.set_num_threads(2)
    try:
        cs.capture(model, corpus[:N], ["transformer.h.0"], str(tmp_path / "out"),
                   tokenizer=tokenizer, **KW)
        after = torch.get_num_threads()
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
    finally:
        hook.remove()
        torch.set_num_threads(before)
    assert any(name.startswith("crowstream-encoder") for name in seen)
    assert any(name.startswith("crowstream-writer") for name in seen)
    assert all(counts == {1} for counts in seen.values()), seen
    assert forward and set(forward) == {2} and after == 2 and later == [2]


def _parts(run):
    return sorted((p.path, p.sha256) for s in run.manifest.shards for p in s.parts)


def test_a_capture_with_the_gate_writes_the_same_bytes(gpt2, corpus, tmp_path, monkeypatch):
    """The gate only reorders work in time: the same files, byte for byte, with it on (as
    on a CPU whose cores the forward takes) and off (a GPU, or spare cores); the forwards
    and the writers' waits really go through it."""
    from crowstream.pipeline import threads, tracing

    model, tokenizer = gpt2
    modules = ["transformer.h.0", "transformer.h.1"]
    monkeypatch.setattr(tracing, "_forward_takes_every_core", lambda device: False)
    off = cs.capture(model, corpus[:N], modules, str(tmp_path / "off"), tokenizer=tokenizer, **KW)
    used = {"forwards": 0, "waits": 0}
    forward, wait_idle = threads.ForwardGate.forward, threads.ForwardGate.wait_idle

    def counted_forward(gate):
        used["forwards"] += 1
        return forward(gate)

    def counted_wait(gate):
        used["waits"] += 1
        wait_idle(gate)

    monkeypatch.setattr(tracing, "_forward_takes_every_core", lambda device: True)
    monkeypatch.setattr(threads.ForwardGate, "forward", counted_forward)
    monkeypatch.setattr(threads.ForwardGate, "wait_idle", counted_wait)
    on = cs.capture(model, corpus[:N], modules, str(tmp_path / "on"), tokenizer=tokenizer, **KW)
    assert _parts(on) == _parts(off)
    assert used["forwards"] >= N // KW["batch_size"] and used["waits"] > used["forwards"]


@pytest.mark.parametrize("threads, cpus, device, gated", [
    (2, 2, "cpu", True), (4, 2, "cpu", True), (1, 2, "cpu", False), (2, 2, "meta", False)])
def test_the_gate_is_on_only_for_a_cpu_forward_on_every_core(monkeypatch, threads, cpus,
                                                              device, gated):
    from crowstream.pipeline import tracing

    monkeypatch.setattr(tracing.torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert tracing._forward_takes_every_core(torch.device(device)) is gated


# the forward's own output, kept without a copy where that is safe -------------------------
EARLY, DEEPEST = "transformer.drop", "transformer.h.0.ln_1"


def _doubling_model(gpt2_dir, big=None):
    """The tiny GPT-2, whose block 0 doubles its input in place before its first layer norm:
    `transformer.drop`'s output (the same tensor) changes after the trace has read it. With
    `big`, one token's embedding is set to that value (beyond float16's range)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    if big is not None:
        with torch.no_grad():
            model.transformer.wte.weight[7] = big
    model.transformer.h[0].ln_1.register_forward_pre_hook(lambda module, args: args[0].mul_(2))
    return model


def _reference(model, docs) -> dict:
    """Each document alone through a plain forward: {module: [n, d]} as the trace saw it."""
    seen = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: seen.setdefault(name, []).append(out[0].clone()))
        for name in (EARLY, DEEPEST)]
    with torch.no_grad():
        for ids in docs:
            model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(seen[name]).numpy() for name in seen}


@pytest.mark.parametrize("dtype, clamp", [("float32", False), ("float16", False),
                                          ("float16", True)])
def test_rows_kept_without_a_copy_equal_a_plain_forward(gpt2, gpt2_dir, tmp_path, monkeypatch,
                                                        dtype, clamp):
    """Every position kept (equal-length documents): the deepest output is stored from the
    forward's own tensor (no pooled copy), float16 rows are cast straight from it, and an
    earlier output that a later layer changes in place is still stored as the trace saw
    it. Clamping to float16 does not write into the model's tensor: the deepest module,
    which reads the clamped module's output, is as in a plain forward."""
    rng = np.random.default_rng(0)
    docs = [[7, *rng.integers(10, 500, 15).tolist()] for _ in range(8)]
    model = _doubling_model(gpt2_dir, big=1e5 if clamp else None)
    reference = _reference(model, docs)
    borrowed = []
    real_select = ModelTracer._select

    def spy(self, flat, index, last=False):
        rows = real_select(self, flat, index, last)
        borrowed.append((last, rows.buffer is None and rows.tensor.data_ptr() == flat.data_ptr()))
        return rows

    monkeypatch.setattr(ModelTracer, "_select", spy)
    out = tmp_path / "out"
    cs.capture(model, [{"ids": ids} for ids in docs], [EARLY, DEEPEST], str(out),
               tokenizer=gpt2[1], tokens_field="ids", batch_size=4, shard_size=8, dtype=dtype,
               float16_overflow="clamp" if clamp else "error", progress=False)
    rows = read_rows(out)
    for name in (EARLY, DEEPEST):
        want = reference[name]
        if dtype == "float16":
            want = np.clip(want, -65504, 65504).astype(np.float16)
        np.testing.assert_allclose(rows[name][3].astype(np.float32), want.astype(np.float32),
                                   rtol=1e-3 if dtype == "float16" else 1e-5, atol=1e-5)
    if dtype == "float32":  # the deepest module's rows were the forward's; the early ones copied
        assert borrowed and all(was == last for last, was in borrowed)
        assert {last for last, _ in borrowed} == {True, False}


def test_the_deepest_output_is_kept_without_a_copy_on_any_device():
    """The rule is the trace's (nothing runs after the deepest module), not the CPU's: on
    another device the last output is handed on as it is too, and an earlier one, or one
    whose batch dropped a row, is selected into a new tensor. (`meta` stands in for a GPU.)"""
    flat = torch.empty(6, 4, device="meta")
    every, fewer = torch.arange(6, device="meta"), torch.arange(5, device="meta")
    assert ModelTracer._select(None, flat, every, last=True).tensor is flat
    assert ModelTracer._select(None, flat, every, last=False).tensor is not flat
    assert ModelTracer._select(None, flat, fewer, last=True).tensor.shape == (5, 4)


@pytest.mark.parametrize("clamp", [False, True])
def test_rows_cast_on_a_device_leave_it_in_the_stored_dtype(clamp):
    """Off the CPU, float32 rows stored as float16 are cast before the copy to the host (half
    its bytes), after their peak is taken or their overflow clamped and counted. (`meta`
    stands in for a GPU.)"""
    flat = torch.empty(6, 4, device="meta")
    rows, peak, count = ModelTracer._select_cast(None, flat, torch.arange(5, device="meta"),
                                                 torch.float16, clamp)
    assert rows.tensor.dtype == torch.float16 and rows.tensor.shape == (5, 4)
    assert (peak is None, count is None) == (clamp, not clamp)


def test_a_module_on_the_cpu_of_a_cuda_model_is_handed_over_as_selected():
    """With device_map a captured module may run on the CPU: its rows, already selected into
    a buffer of the (pinned) pool, go to the writers as they are, with that buffer to give
    back, no second copy, and no CUDA event (a CPU tensor has no CUDA stream)."""
    class NoCopies:
        def take(self, shape, dtype):
            raise AssertionError("rows on the CPU were copied again")

    tracer = types.SimpleNamespace(pool=NoCopies())
    selected, whole = Rows(torch.ones(3, 2), buffer="pool buffer"), Rows(torch.zeros(4, 2))
    captured = ModelTracer._to_host(tracer, {"a": selected, "b": whole}, {}, {})
    assert captured.vectors["a"] is selected.tensor and captured.vectors["b"] is whole.tensor
    assert captured.buffers == {"a": "pool buffer"} and captured.ready == ()
