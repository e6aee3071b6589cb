"""Stage 3's look at the model before capture. It owns what is known from the model alone:
resolving module names and globs, the probe forward that finds the requested modules'
output shapes and execution order (and stops after the last of them), which shapes can be
captured (one d-vector per token), the device input ids go to, and eval mode.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import itertools

import torch

from crowstream.format.layout import (INPUT_SUFFIX, base_module, check_module_name, is_glob,
                                      match_modules)
from crowstream.errors import ModuleNotFoundInModel, ModuleOutputError


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
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **no_cache_kwargs(model))
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


def no_cache_kwargs(model) -> dict:
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


def capturable(shape, tokens: int) -> bool:
    """Whether a probe output of `shape` (from `PROBE_ROWS` rows of `tokens` tokens) is one
    d-vector per token of each row, the only thing crowstream stores."""
    return isinstance(shape, tuple) and shape[:2] == (PROBE_ROWS, tokens) and len(shape) == 3


def check_shape(name: str, shape, model, tokens: int) -> int:
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
