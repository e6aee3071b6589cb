"""Stage 3, capture. It owns running the model: resolving module names and globs,
finding their execution order once with a probe forward, and one nnsight trace per batch
that reads every requested module in that order, stops after the deepest, and returns
each module's kept rows (padding dropped, checked against float16's range and cast on the
model's device when float16 is stored, then one copy into pooled host buffers: pinned
behind a GPU, ordinary memory on the CPU). The model runs in eval mode during capture; afterwards it is left as it was found.

(Named `tracing`, not `capture`: a submodule `capture` would shadow the public function.)
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import inspect
import itertools
import logging
import warnings

import torch

from crowstream.pipeline.host import Captured, HostPool, Rows, on_cpu, to_host
from crowstream.pipeline.options import FLOAT16_MAX
from crowstream.pipeline.threads import ForwardGate, usable_cpus
from crowstream.format.layout import (INPUT_SUFFIX, base_module, check_module_name, is_glob,
                                      match_modules)
from crowstream.errors import ModuleNotFoundInModel, ModuleOutputError

log = logging.getLogger("crowstream")


@contextlib.contextmanager
def eval_mode(model):
    """`model.eval()` for the block; afterwards every submodule gets back its own
    training flag, also after an error or an interrupt. (`inference_mode` does not
    switch dropout off: a model handed over from a training loop would be captured with
    dropout on.)"""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def resolve_modules(model, requested) -> list[str]:
    """Exact names and globs -> module names, in the order given, without duplicates.
    A name or glob ending in `:input` selects the matching modules' inputs."""
    if isinstance(requested, str):
        requested = [requested]
    requested = list(requested)
    if not requested:
        raise ModuleNotFoundInModel("no modules given; name at least one "
                                    "(`crowstream modules MODEL` lists them).")
    names = [name for name, _ in model.named_modules() if name]
    known = set(names)
    resolved: list[str] = []
    for pattern in requested:
        if not isinstance(pattern, str):
            raise ModuleNotFoundInModel(f"module names must be strings, got {pattern!r}.")
        suffix = INPUT_SUFFIX if pattern.endswith(INPUT_SUFFIX) else ""
        pattern = base_module(pattern)
        if is_glob(pattern):
            matches = match_modules(pattern, names)
            if not matches:
                raise ModuleNotFoundInModel(
                    f"module pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"{_close(pattern, names)}run `crowstream modules MODEL` to list them.")
        elif pattern in known:
            matches = [pattern]
        else:
            raise ModuleNotFoundInModel(
                f"module {pattern!r} is not in {type(model).__name__}; "
                f"{_close(pattern, names)}run `crowstream modules MODEL` to list them.")
        resolved.extend(m + suffix for m in matches if m + suffix not in resolved)
    for name in resolved:
        check_module_name(name)
    return resolved


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f"did you mean {', '.join(map(repr, close))}? " if close else ""


class _ProbeDone(Exception):
    """Raised by a probe hook once every module asked for has run: the rest of the
    forward is not needed (a mid-depth module of a large model skips the deeper layers)."""


def probe_shapes(model, tokenizer, only=None) -> dict[str, tuple | str]:
    """Run one tiny forward with plain hooks; -> {name: output shape, in execution order}.
    A module whose output holds no tensor maps to a string describing its type. Names in
    `only` ending in `:input` get their module's first input (as nnsight's `.input`: the
    first positional argument, else the first keyword), in the order it arrives. With
    `only`, the forward stops once all of them have run."""
    targets = {n: m for n, m in model.named_modules() if n and (only is None or n in only)}
    inputs = {n: model.get_submodule(base_module(n)) for n in only or () if base_module(n) != n}
    seen: dict[str, tuple | str] = {}

    def saw(name, value) -> None:
        if name not in seen:
            seen[name] = _describe(value)
            if only is not None and len(seen) == len(only):
                raise _ProbeDone

    def hook(name):
        def record(module, args, output):
            saw(name, output)
        return record

    def pre_hook(name):
        def record(module, args, kwargs):
            saw(name, args[0] if args else next(iter(kwargs.values()), None))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    handles += [m.register_forward_pre_hook(pre_hook(n), with_kwargs=True)
                for n, m in inputs.items()]
    try:
        ids = probe_ids(tokenizer, model)
        with torch.inference_mode(), eval_mode(model):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **_no_cache(model))
    except _ProbeDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


PROBE_ROWS = 2  # a module whose output keeps batch size 1 (position embeddings) shows


def probe_ids(tokenizer, model) -> torch.Tensor:
    """[PROBE_ROWS, T] token ids of a short text (the rows differ: the second is reversed)."""
    ids = tokenizer("Hello world, hello probe.", add_special_tokens=True)["input_ids"][:8]
    if len(ids) < 2:
        ids = list(ids) + [tokenizer.eos_token_id or 0] * (2 - len(ids))
    return torch.tensor([ids, ids[::-1]], device=input_device(model))


def _describe(output):
    value = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return type(output).__name__


def _no_cache(model) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def input_device(model) -> torch.device:
    """Where the input ids must go: the input embeddings' device. Not the first parameter,
    which with `device_map` may sit on another GPU, on `meta`, or be offloaded; for an
    offloaded embedding, accelerate's hook names the device it executes on."""
    embeddings = None
    with contextlib.suppress(AttributeError, NotImplementedError):
        embeddings = model.get_input_embeddings()
    candidates = [embeddings] if isinstance(embeddings, torch.nn.Module) else []
    for module in [*candidates, model]:
        executes_on = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if executes_on is not None:
            if isinstance(executes_on, int):  # a bare GPU index
                executes_on = f"cuda:{executes_on}"
            return torch.device(executes_on)
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")


class ModelTracer:
    """Wraps a model with nnsight for the length of a run; use as a context manager.

    On exit every module's `forward` and nnsight state are put back as they were, so
    the user's model object carries nothing of crowstream or nnsight afterwards.
    """

    def __init__(self, model, tokenizer, module_names: list[str], dtype: str,
                 float16_overflow: str = "error", inflight_bytes: int = 1 << 30,
                 packing: str = "off"):
        from .packing import supports_packing

        self.model = model
        self.packs = packing == "auto" and supports_packing(model)  # batches arrive packed
        if packing == "auto" and not self.packs:
            log.debug("packing='auto': %s is not one of the packing architectures; batches are "
                     "padded", type(model).__name__)
        self.mask_dtype = getattr(model, "dtype", torch.float32)
        self.dtype = getattr(torch, dtype)
        self.float16_overflow = float16_overflow
        self.device = input_device(model)
        # a CPU forward on every core holds the writers back while it runs (ForwardGate)
        self.gate = ForwardGate() if _forward_takes_every_core(self.device) else None
        # host buffers kept for reuse: a quarter of the in-flight budget
        self.pool = HostPool.for_device(inflight_bytes // 4, self.device.type == "cuda")
        shapes = probe_shapes(model, tokenizer, only=set(module_names))
        tokens = probe_ids(tokenizer, model).shape[1]
        self.dims = {name: _check_shape(name, shapes.get(name), model, tokens)
                     for name in module_names}
        self.types = {name: type(model.get_submodule(base_module(name))).__name__
                      for name in module_names}
        # Reads in a trace must follow execution order: order by the probe, not the user.
        self.order = [name for name in shapes if name in self.dims]
        self.forward_kwargs = _no_cache(model)
        self._saved_state = None
        self._eval = None

    def __enter__(self) -> ModelTracer:

        self._eval = eval_mode(self.model)
        self._eval.__enter__()
        self._saved_state = {m: {k: m.__dict__[k] for k in ("forward", "__nnsight__") if k in m.__dict__}
                             for m in self.model.modules()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nnsight already serves.*")
            self.wrapped = _wrapper_class()(self.model)
            self.wrapped._crowstream_device = self.device
        envoys = dict(self.wrapped.named_modules())
        self.envoys = [(name, envoys[f"model.{base_module(name)}"], name != base_module(name))
                       for name in self.order]
        return self

    def __exit__(self, *exc) -> None:
        try:
            for module, saved in (self._saved_state or {}).items():
                for key in ("forward", "__nnsight__"):
                    module.__dict__.pop(key, None)
                module.__dict__.update(saved)
            self.wrapped = self.envoys = self._saved_state = None
        finally:
            if self._eval is not None:
                self._eval.__exit__(*exc)
                self._eval = None

    def run(self, batch) -> Captured:
        """One forward pass over `batch`; the rows its keep-mask selects, per module."""
        on_cuda = self.device.type == "cuda"
        ids = batch.input_ids.to(self.device, non_blocking=on_cuda)
        index = batch.keep_index.to(self.device, non_blocking=on_cuda)
        with torch.inference_mode(), self.gate.forward() if self.gate else contextlib.nullcontext():
            if batch.segments is None:
                mask = batch.attention_mask.to(self.device, non_blocking=on_cuda)
                kept, peaks, clamped = self._trace(ids, mask, index)
            else:  # packed: a block-diagonal causal mask, positions restarting per piece
                from .packing import packed_mask

                segments = batch.segments.to(self.device, non_blocking=on_cuda)
                positions = batch.position_ids.to(self.device, non_blocking=on_cuda)
                kept, peaks, clamped = self._trace(ids, packed_mask(segments, self.mask_dtype),
                                                   index, position_ids=positions)
        gc.collect(1)  # a stopped trace leaves cycles holding its frames; young gen suffices
        if self.device.type == "cpu":  # the rows are already in the pool's buffers
            buffers = {name: rows.buffer for name, rows in kept.items() if rows.buffer is not None}
            return Captured(on_cpu({name: rows.tensor for name, rows in kept.items()}), (),
                            on_cpu(peaks), on_cpu(clamped), buffers, self.pool)
        kept = {name: rows.tensor for name, rows in kept.items()}
        if not on_cuda:  # an accelerator (MPS, XPU) copied synchronously
            return Captured(on_cpu(kept), peaks=on_cpu(peaks), clamped=on_cpu(clamped))
        host, buffers = {}, {}
        for name, rows in kept.items():
            host[name], buffers[name] = self.pool.take(rows.shape, rows.dtype)
            host[name].copy_(rows, non_blocking=True)
        peaks, clamped = to_host(peaks), to_host(clamped)
        # the writer thread waits on these instead of this thread syncing the device;
        # with device_map, outputs (and so copies) may sit on several GPUs
        events = []
        for device in {rows.device for rows in kept.values()}:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return Captured(host, tuple(events), peaks, clamped, buffers, self.pool)

    def _select(self, flat: torch.Tensor, index: torch.Tensor) -> Rows:
        """`flat`'s kept rows: on the CPU selected straight into a pooled buffer (no fresh
        [N, d] tensor per batch), elsewhere on the device (copied to the host later)."""
        if flat.device.type != "cpu":
            return Rows(flat.index_select(0, index))
        out, buffer = self.pool.take((index.numel(), flat.shape[1]), flat.dtype)
        return Rows(torch.index_select(flat, 0, index, out=out), buffer)

    def _select_cast(self, flat: torch.Tensor, index: torch.Tensor, dtype: torch.dtype,
                     clamp: bool):
        """`flat`'s kept rows in the stored `dtype` -> (Rows, peak or None, clamped count or
        None), as `_stored` makes them. On the CPU CAST_BLOCK_BYTES of rows at a time go
        through one pooled scratch block into a pooled buffer, so each block is read back
        from the cache, not from memory (three passes over [N, d] float32 took 1.3 CPU-s per
        GB stored at d = 4,096); on a device, all at once."""
        if flat.device.type != "cpu":
            rows, peak, count = _stored(flat.index_select(0, index), dtype, clamp)
            return Rows(rows), peak, count
        n, d = index.numel(), flat.shape[1]
        out, buffer = self.pool.take((n, d), dtype)
        step = max(1, CAST_BLOCK_BYTES // (d * flat.element_size()))
        scratch, scratch_buffer = self.pool.take((min(step, n), d), flat.dtype)
        peak = count = None
        try:
            for start in range(0, n, step):
                block = scratch[:min(step, n - start)]
                torch.index_select(flat, 0, index[start:start + step], out=block)
                rows, block_peak, block_count = _stored(block, dtype, clamp)
                peak = _combine(peak, block_peak, torch.maximum)
                count = _combine(count, block_count, torch.add)
                out[start:start + len(rows)].copy_(rows)
        finally:
            self.pool.give(scratch_buffer)
        return Rows(out, buffer), peak, count

    def _trace(self, ids, mask, index, position_ids=None):
        """-> ({module: kept rows}, {module: peak magnitude}, {module: clamped count})."""
        import nnsight

        kept, peaks, clamped = {}, {}, {}
        envoys, dtype, clamp = self.envoys, self.dtype, self.float16_overflow == "clamp"
        extra = {} if position_ids is None else {"position_ids": position_ids}
        with self.wrapped.trace(input_ids=ids, attention_mask=mask, **extra,
                                **self.forward_kwargs) as tracer:
            for name, envoy, is_input in envoys:
                value = envoy.input if is_input else envoy.output
                if isinstance(value, tuple):
                    value = value[0]
                # [B, T, d] -> [N_kept, d], cast on the output's device before the copy
                flat, index = value.reshape(-1, value.shape[-1]), index.to(value.device)
                if not _casts(flat.dtype, dtype):
                    kept[name] = nnsight.save(self._select(flat, index))
                    continue
                rows, peak, count = self._select_cast(flat, index, dtype, clamp)
                kept[name] = nnsight.save(rows)
                if peak is not None:  # checked on the writer thread: no device sync here
                    peaks[name] = nnsight.save(peak)
                if count is not None:
                    clamped[name] = nnsight.save(count)
            tracer.stop()
        return kept, peaks, clamped


CAST_BLOCK_BYTES = 1 << 20  # rows selected and cast at a time, on the CPU


def _forward_takes_every_core(device: torch.device) -> bool:
    """A CPU forward whose intra-op threads cover every CPU this process may use."""
    return device.type == "cpu" and torch.get_num_threads() >= usable_cpus()


def _stored(rows: torch.Tensor, dtype: torch.dtype, clamp: bool):
    """Kept rows (ours to change) -> (them ready to cast to `dtype`, their peak magnitude or
    None, the count clamped or None). float16 is range-checked: clamped in float32 (bf16
    rounds 65504 up to 65536) and counted, or its peak taken for the writer to check."""
    if dtype != torch.float16:
        return rows, None, None
    if clamp:
        rows = rows.float()
        count = (rows.abs() > FLOAT16_MAX).sum()
        return rows.clamp_(-FLOAT16_MAX, FLOAT16_MAX), None, count
    return rows, _peak(rows), None


def _combine(total, part, op):
    """A running figure over blocks (None until the first block that has one)."""
    return part if total is None else op(total, part)


def _peak(rows: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in `rows` (0-d, on their device), NaN ignored; infinities kept."""
    if not rows.numel():
        return rows.new_zeros(())
    if rows.device.type == "cpu":  # no [N, d] temporary, unless there is a NaN
        low, high = torch.aminmax(rows)
        peak = torch.maximum(-low, high)
        if not torch.isnan(peak):
            return peak
    return rows.abs().nan_to_num_(nan=0.0, posinf=float("inf")).amax()


def _upcast_on_host(have: torch.dtype, want: torch.dtype) -> bool:
    """16-bit rows stored as float32 travel in 16 bits and are upcast on the host."""
    return want == torch.float32 and have in (torch.bfloat16, torch.float16)


def _casts(have: torch.dtype, want: torch.dtype) -> bool:
    """Whether rows of dtype `have` are cast on the device to be stored as `want`."""
    return have != want and not _upcast_on_host(have, want)


@functools.cache
def _wrapper_class():
    """nnsight's wrapper, except that it leaves the inputs on the device we chose: its own
    choice, the first parameter's device, is wrong for `device_map` models (meta, offload)."""
    import nnsight

    class Wrapped(nnsight.NNsight):
        @property
        def device(self) -> torch.device:
            return self._crowstream_device

    return Wrapped


def capturable(shape, tokens: int) -> bool:
    """Whether a probe output of `shape` (from `PROBE_ROWS` rows of `tokens` tokens) is one
    d-vector per token of each row, the only thing crowstream stores."""
    return isinstance(shape, tuple) and shape[:2] == (PROBE_ROWS, tokens) and len(shape) == 3


def _check_shape(name: str, shape, model, tokens: int) -> int:
    """-> d for a module whose probe output is `[PROBE_ROWS, tokens, d]`; anything else (no
    output, not a tensor, another rank, one row for the whole batch, or a changed sequence
    length) is refused."""
    if capturable(shape, tokens):
        return int(shape[-1])
    is_input = name != base_module(name)
    children = [n for n, _ in model.named_modules() if n.startswith(base_module(name) + ".")][:5]
    hint = (f" Try a submodule such as {', '.join(map(repr, children))}." if children
            else " Pick a block or a layer whose output is one [batch, seq, d] tensor.")
    if shape is None:
        raise ModuleOutputError(f"module {name!r} did not run in the forward pass, so it has no "
                                f"{'input' if is_input else 'output'} to capture (containers "
                                f"such as ModuleList never run).{hint}")
    verb = "receives" if is_input else "returns"
    if isinstance(shape, tuple) and len(shape) == 3 and shape[0] != PROBE_ROWS:
        raise ModuleOutputError(f"module {name!r} {verb} {shape} for a batch of {PROBE_ROWS} "
                                "sequences: one row shared by the whole batch (as position "
                                "embeddings are), not one per document, so its rows cannot be "
                                f"matched to documents.{hint}")
    if isinstance(shape, tuple) and len(shape) == 3:
        raise ModuleOutputError(f"module {name!r} {verb} {shape} for an input of {tokens} tokens: "
                                "it changes the sequence length, so its rows cannot be matched "
                                f"to tokens.{hint}")
    raise ModuleOutputError(f"module {name!r} {verb} {shape}, not a [batch, seq, d] tensor; "
                            f"crowstream stores one d-vector per token.{hint}")
