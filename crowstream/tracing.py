"""Stage 3, capture. It owns running the model: resolving module names and globs,
finding their execution order once with a probe forward, and one nnsight trace per batch
that reads every requested module in that order, stops after the deepest, and returns
each module's kept rows (padding dropped, cast to the output dtype on the model's device,
then one device-to-host copy). It also leaves the user's model as it found it.

(Named `tracing`, not `capture`: a submodule `capture` would shadow the public function.)
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import inspect
import re
import warnings

import torch

from .config import INPUT_SUFFIX, check_module_name
from .errors import ModuleNotFoundInModel, ModuleOutputError

_GLOB_CHARS = set("*?[")


@dataclasses.dataclass
class Captured:
    """Kept rows of one batch: {module: [N, d]} on the CPU, valid once `wait()` returns."""

    vectors: dict[str, torch.Tensor]
    ready: tuple = ()  # CUDA events, one per device the copies came from

    def wait(self) -> None:
        for event in self.ready:
            event.synchronize()


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
        pattern = pattern[:len(pattern) - len(suffix)]
        if _GLOB_CHARS & set(pattern):
            regex = _glob_regex(pattern)
            matches = [n for n in names if regex.fullmatch(n)]
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


def _glob_regex(pattern: str) -> re.Pattern:
    """`*` matches within one dotted component (`transformer.h.*` -> the blocks, not
    their submodules), `**` matches across components, `?` one character, `[...]` a set."""
    parts = re.split(r"(\*\*|\*|\?|\[[^\]]*\])", pattern)
    table = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return re.compile("".join(table.get(p) or (p if p.startswith("[") else re.escape(p))
                              for p in parts))


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f"did you mean {', '.join(map(repr, close))}? " if close else ""


def probe_shapes(model, tokenizer, only=None) -> dict[str, tuple | str]:
    """Run one tiny forward with plain hooks; -> {name: output shape, in execution order}.
    A module whose output holds no tensor maps to a string describing its type. Names in
    `only` ending in `:input` get their module's first input (as nnsight's `.input`: the
    first positional argument, else the first keyword), in the order it arrives."""
    targets = {n: m for n, m in model.named_modules() if n and (only is None or n in only)}
    inputs = {n: model.get_submodule(n[:-len(INPUT_SUFFIX)]) for n in only or ()
              if n.endswith(INPUT_SUFFIX)}
    seen: dict[str, tuple | str] = {}

    def hook(name):
        def record(module, args, output):
            if name not in seen:
                seen[name] = _describe(output)
        return record

    def pre_hook(name):
        def record(module, args, kwargs):
            if name not in seen:
                seen[name] = _describe(args[0] if args else next(iter(kwargs.values()), None))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    handles += [m.register_forward_pre_hook(pre_hook(n), with_kwargs=True)
                for n, m in inputs.items()]
    try:
        ids = _probe_ids(tokenizer, model)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **_no_cache(model))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _probe_ids(tokenizer, model) -> torch.Tensor:
    ids = tokenizer("Hello world, hello probe.", add_special_tokens=True)["input_ids"][:8]
    if len(ids) < 2:
        ids = list(ids) + [tokenizer.eos_token_id or 0] * (2 - len(ids))
    return torch.tensor([ids], device=_device_of(model))


def _describe(output):
    value = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return type(output).__name__


def _no_cache(model) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def _device_of(model) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


class ModelTracer:
    """Wraps a model with nnsight for the length of a run; use as a context manager.

    On exit every module's `forward` and nnsight state are put back as they were, so
    the user's model object carries nothing of crowstream or nnsight afterwards.
    """

    def __init__(self, model, tokenizer, module_names: list[str], dtype: str):
        self.model = model
        self.dtype = getattr(torch, dtype)
        self.device = _device_of(model)
        shapes = probe_shapes(model, tokenizer, only=set(module_names))
        self.dims = {name: _check_shape(name, shapes.get(name), model) for name in module_names}
        self.types = {name: type(model.get_submodule(_base(name))).__name__
                      for name in module_names}
        # Reads in a trace must follow execution order: order by the probe, not the user.
        self.order = [name for name in shapes if name in self.dims]
        self.forward_kwargs = _no_cache(model)
        self._saved_state = None

    def __enter__(self) -> ModelTracer:
        import nnsight

        self._saved_state = {m: {k: m.__dict__[k] for k in ("forward", "__nnsight__") if k in m.__dict__}
                             for m in self.model.modules()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nnsight already serves.*")
            self.wrapped = nnsight.NNsight(self.model)
        envoys = dict(self.wrapped.named_modules())
        self.envoys = [(name, envoys[f"model.{_base(name)}"], name != _base(name))
                       for name in self.order]
        return self

    def __exit__(self, *exc) -> None:
        for module, saved in (self._saved_state or {}).items():
            for key in ("forward", "__nnsight__"):
                module.__dict__.pop(key, None)
            module.__dict__.update(saved)
        self.wrapped = self.envoys = self._saved_state = None

    def run(self, batch) -> Captured:
        """One forward pass over `batch`; the rows its keep-mask selects, per module."""
        on_cuda = self.device.type == "cuda"
        ids = batch.input_ids.to(self.device, non_blocking=on_cuda)
        mask = batch.attention_mask.to(self.device, non_blocking=on_cuda)
        index = batch.keep_index.to(self.device, non_blocking=on_cuda)
        with torch.inference_mode():
            kept = self._trace(ids, mask, index)
        gc.collect(1)  # a stopped trace leaves cycles holding its frames; young gen suffices
        if not on_cuda:
            return Captured(kept)
        host = {}
        for name, rows in kept.items():
            host[name] = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host[name].copy_(rows, non_blocking=True)
        # the writer thread waits on these instead of this thread syncing the device;
        # with device_map, outputs (and so copies) may sit on several GPUs
        events = []
        for device in {rows.device for rows in kept.values()}:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return Captured(host, tuple(events))

    def _trace(self, ids, mask, index) -> dict[str, torch.Tensor]:
        import nnsight

        kept = {}
        envoys, dtype = self.envoys, self.dtype
        with self.wrapped.trace(input_ids=ids, attention_mask=mask, **self.forward_kwargs) as tracer:
            for name, envoy, is_input in envoys:
                value = envoy.input if is_input else envoy.output
                if isinstance(value, tuple):
                    value = value[0]
                # [B, T, d] -> [N_kept, d], cast on the output's device before the copy
                rows = value.reshape(-1, value.shape[-1]).index_select(0, index.to(value.device))
                kept[name] = nnsight.save(rows.to(dtype))
            tracer.stop()
        return kept


def _base(name: str) -> str:
    """The module a name refers to: `x:input` -> `x`."""
    return name[:-len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name


def _check_shape(name: str, shape, model) -> int:
    if isinstance(shape, tuple) and len(shape) == 3 and shape[0] == 1:
        return int(shape[-1])
    is_input = name != _base(name)
    children = [n for n, _ in model.named_modules() if n.startswith(_base(name) + ".")][:5]
    hint = (f" Try a submodule such as {', '.join(map(repr, children))}." if children
            else " Pick a block or a layer whose output is one [batch, seq, d] tensor.")
    if shape is None:
        raise ModuleOutputError(f"module {name!r} did not run in the forward pass, so it has no "
                                f"{'input' if is_input else 'output'} to capture (containers "
                                f"such as ModuleList never run).{hint}")
    raise ModuleOutputError(f"module {name!r} {'receives' if is_input else 'returns'} {shape}, "
                            "not a [batch, seq, d] tensor; "
                            f"crowstream stores one d-vector per token.{hint}")
