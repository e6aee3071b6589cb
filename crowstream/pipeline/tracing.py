"""Stage 3, capture. It owns running the model (names, shapes and order come from
`probe.py`): one nnsight trace per batch
that reads every requested module in that order, stops after the deepest, and returns
each module's kept rows (padding dropped, checked against float16's range and cast on the
model's device when float16 is stored, then one copy into pooled host buffers: pinned
behind a GPU, ordinary memory on the CPU). The model runs in eval mode during capture; afterwards it is left as it was found.

(Named `tracing`, not `capture`: a submodule `capture` would shadow the public function.)
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import warnings

import torch

from crowstream.pipeline.host import Captured, HostPool, Rows, on_cpu, to_host
from crowstream.pipeline.options import FLOAT16_MAX
from crowstream.pipeline.probe import (check_shape, eval_mode, input_device, no_cache_kwargs,
                                       probe_ids, probe_shapes)
from crowstream.pipeline.threads import ForwardGate, usable_cpus
from crowstream.format.layout import base_module

log = logging.getLogger("crowstream")


class ModelTracer:
    """Wraps a model with nnsight for the length of a run; use as a context manager.

    On exit every module's `forward` and nnsight state are put back as they were, so
    the user's model object carries nothing of crowstream or nnsight afterwards.
    """

    def __init__(self, model, tokenizer, module_names: list[str], dtype: str,
                 float16_overflow: str = "error", inflight_bytes: int = 1 << 30,
                 packing: str = "off"):
        from .packing import mask_dtype, supports_packing

        self.model = model
        self.packs = packing == "auto" and supports_packing(model)  # batches arrive packed
        if packing == "auto" and not self.packs:
            log.debug("packing='auto': %s is not one of the packing architectures; batches are "
                     "padded", type(model).__name__)
        self.mask_dtype = mask_dtype(model)  # of the packed mask
        self.dtype = getattr(torch, dtype)
        self.float16_overflow = float16_overflow
        self.device = input_device(model)
        # a CPU forward on every core holds the writers back while it runs (ForwardGate)
        self.gate = ForwardGate() if _forward_takes_every_core(self.device) else None
        # host buffers kept for reuse: a quarter of the in-flight budget
        self.pool = HostPool.for_device(inflight_bytes // 4, self.device.type == "cuda")
        shapes = probe_shapes(model, tokenizer, only=set(module_names))
        tokens = probe_ids(tokenizer, model).shape[1]
        self.dims = {name: check_shape(name, shapes.get(name), model, tokens)
                     for name in module_names}
        self.types = {name: type(model.get_submodule(base_module(name))).__name__
                      for name in module_names}
        # Reads in a trace must follow execution order: order by the probe, not the user.
        self.order = [name for name in shapes if name in self.dims]
        self.forward_kwargs = no_cache_kwargs(model)
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

                mask = packed_mask(batch.segments, self.mask_dtype, self.device)
                positions = batch.position_ids.to(self.device, non_blocking=on_cuda)
                kept, peaks, clamped = self._trace(ids, mask, index, position_ids=positions)
        gc.collect(1)  # a stopped trace leaves cycles holding its frames; young gen suffices
        if self.device.type == "cpu":  # the rows are already in the pool's buffers
            buffers = {name: rows.buffer for name, rows in kept.items() if rows.buffer is not None}
            return Captured(on_cpu({name: rows.tensor for name, rows in kept.items()}), (),
                            on_cpu(peaks), on_cpu(clamped), buffers, self.pool)
        if not on_cuda:  # an accelerator (MPS, XPU) copied synchronously
            kept = {name: rows.tensor for name, rows in kept.items()}
            return Captured(on_cpu(kept), peaks=on_cpu(peaks), clamped=on_cpu(clamped))
        return self._to_host(kept, peaks, clamped)

    def _to_host(self, kept: dict, peaks: dict, clamped: dict) -> Captured:
        """CUDA: each module's kept rows copied into a pinned buffer without waiting. With
        `device_map` a module may run on the CPU: its rows are already in a pinned buffer
        of the pool (`_select`), handed over as they are."""
        host, buffers, devices = {}, {}, set()
        for name, rows in kept.items():
            if rows.tensor.device.type == "cpu":
                host[name] = rows.tensor
                if rows.buffer is not None:
                    buffers[name] = rows.buffer
                continue
            host[name], buffers[name] = self.pool.take(rows.tensor.shape, rows.tensor.dtype)
            host[name].copy_(rows.tensor, non_blocking=True)
            devices.add(rows.tensor.device)
        peaks, clamped = to_host(peaks), to_host(clamped)
        # the writer threads wait on these instead of this thread syncing the device; with
        # device_map, outputs (and so copies) may sit on several GPUs. Blocking events: a
        # waiting writer sleeps instead of spinning a core through the forward.
        events = []
        for device in devices:
            event = torch.cuda.Event(blocking=True)
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return Captured(host, tuple(events), peaks, clamped, buffers, self.pool)

    def _select(self, flat: torch.Tensor, index: torch.Tensor, last: bool = False) -> Rows:
        """`flat`'s kept rows: on the CPU selected straight into a pooled buffer (no fresh
        [N, d] tensor per batch), elsewhere on the device (copied to the host later).

        The output the trace reads `last` is kept as it is when every row is kept, on any
        device: the trace stops there, so no later operation can change it in place. On a
        CPU that saves the copy (~5% of a capture's CPU on full pre-tokenized windows,
        `benchmarks/cpu_paths.py`); on a GPU, a device copy before the one to the host.
        Earlier outputs are always copied: a later layer may write into them (a residual
        added in place) before the trace ends."""
        if last and index.numel() == flat.shape[0] and flat.is_contiguous():
            return Rows(flat)  # keep_index is sorted and unique: all rows, in order
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
        if flat.device.type != "cpu":  # cast on the device: half the bytes to the host
            rows, peak, count = _stored(flat.index_select(0, index), dtype, clamp)
            return Rows(rows.to(dtype)), peak, count
        n, d = index.numel(), flat.shape[1]
        out, buffer = self.pool.take((n, d), dtype)
        step = max(1, CAST_BLOCK_BYTES // (d * flat.element_size()))
        # every row kept: the cast reads `flat` itself, no selection copy (clamping writes
        # into its block in place, so it keeps the copy: `flat` is the model's own tensor)
        every_row = n == flat.shape[0] and not clamp
        scratch, scratch_buffer = self.pool.take((min(step, n), d), flat.dtype)
        peak = count = None
        try:
            for start in range(0, n, step):
                block = scratch[:min(step, n - start)]
                if every_row:
                    block = flat[start:start + step]
                else:
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
            for at, (name, envoy, is_input) in enumerate(envoys):
                value = envoy.input if is_input else envoy.output
                if isinstance(value, tuple):
                    value = value[0]
                # [B, T, d] -> [N_kept, d], cast on the output's device before the copy
                flat, index = value.reshape(-1, value.shape[-1]), index.to(value.device)
                if not _casts(flat.dtype, dtype):
                    last = at == len(envoys) - 1 and not is_input  # an input runs on after
                    kept[name] = nnsight.save(self._select(flat, index, last))
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
