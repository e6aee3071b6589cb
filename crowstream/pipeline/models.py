"""Loading models and tokenizers. It owns turning a hub id, a local directory or an
already-loaded model into `(model, tokenizer)`, the fingerprints that identify them in
the manifest, the default context size, and `modules()`, the listing of what can be
captured. torch and transformers are imported here, never at package import.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

from crowstream.format.layout import model_id
from crowstream.pipeline.options import DEFAULT_CONTEXT_CAP
from crowstream.checks import looks_like_path
from crowstream.errors import ConfigError, ModelLoadError

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def load_model(model, tokenizer=None, *, device=None, torch_dtype=None, device_map=None,
               revision: str | None = None, trust_remote_code: bool = False):
    """-> (model, tokenizer). A loaded model is used as it is (never moved unless `device`
    is given; capture puts it in eval mode only while it runs); a string is loaded, at
    `revision` (a branch, tag or commit, e.g. Pythia's "step1000") if given, with
    AutoModelForCausalLM when the config names a causal-LM architecture, else AutoModel
    (encoders such as BERT)."""
    import torch
    import transformers

    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if isinstance(tokenizer, os.PathLike):
        tokenizer = os.fspath(tokenizer)
    if isinstance(model, str):
        name = model
        config = _config(name, trust_remote_code, revision)
        if tokenizer is None:  # before the weights: a missing tokenizer fails in seconds
            tokenizer = _tokenizer(name, trust_remote_code, revision)
        model = _from_pretrained(name, config, torch_dtype, device_map, revision,
                                 trust_remote_code)
        if device_map is None:
            model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    elif isinstance(model, torch.nn.Module):
        refuse_encoder_decoder(getattr(model, "config", None),
                               str(getattr(model, "name_or_path", "") or type(model).__name__))
        if revision is not None:
            raise ConfigError(f"revision={revision!r} only applies to a model given by name; "
                              "this model is already loaded.")
        if device is not None:
            model.to(device)
    else:
        raise ConfigError(f"model must be a hub id, a local directory or a loaded "
                          f"transformers model; got {type(model).__name__}.")
    if tokenizer is None:
        raise ConfigError("a loaded model needs its tokenizer: pass tokenizer=.")
    if isinstance(tokenizer, str):
        tokenizer = _tokenizer(tokenizer, trust_remote_code)
    if not isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        raise ConfigError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    return model, tokenizer


def _config(name: str, trust_remote_code: bool, revision: str | None = None):
    import transformers

    _check_exists(name)
    at = {"revision": revision} if revision is not None else {}
    try:
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                         **at)
    except OSError as error:
        raise _load_error(name, error) from error
    refuse_encoder_decoder(config, name)
    return config


def _load_error(name: str, error: OSError) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model {name!r}: {error}. Without network access, pass a local "
        "directory (save_pretrained output) or set HF_HUB_OFFLINE=1 to use the local cache.")


def _from_pretrained(name: str, config, torch_dtype, device_map, revision,
                     trust_remote_code: bool):
    import transformers

    at = {"revision": revision} if revision is not None else {}
    try:
        archs = getattr(config, "architectures", None) or []
        causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        kwargs = {"trust_remote_code": trust_remote_code, **at}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        return auto.from_pretrained(name, config=config, **kwargs).eval()
    except OSError as error:
        raise _load_error(name, error) from error


def refuse_encoder_decoder(config, name: str) -> None:
    """crowstream feeds `input_ids` to one stack; T5/BART-style models need decoder inputs
    too, so they are refused in one line rather than failing inside their forward."""
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"model {name!r} ({type(config).__name__.removesuffix('Config')}) is an "
            "encoder-decoder model; crowstream captures decoder-only and encoder-only models. "
            "Load its encoder yourself (e.g. T5EncoderModel) and pass that model with tokenizer=.")


def _tokenizer(name: str, trust_remote_code: bool, revision: str | None = None):
    import transformers

    if os.path.isdir(name) and not any(_is_tokenizer_file(f) for f in os.listdir(name)):
        # transformers 5 would build an empty tokenizer (one token) here, silently
        raise ModelLoadError(f"could not load the tokenizer for {name!r}: the directory has no "
                             "tokenizer files (tokenizer.json, vocab.*, *.model). Save the "
                             "tokenizer there (tokenizer.save_pretrained) or pass tokenizer= "
                             "(an object or a local directory).")
    try:
        at = {"revision": revision} if revision is not None else {}
        return transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                          **at)
    except (OSError, ValueError, TypeError) as error:  # a directory without tokenizer files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"could not load the tokenizer for {name!r}: {reason[:200]}. "
                             "Pass tokenizer= (an object or a local directory).") from error


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "vocab", "spiece")) or name.endswith(".model") \
        or name == "merges.txt"


def _check_exists(name: str) -> None:
    if os.path.isdir(name):
        return
    if looks_like_path(name) or os.path.isfile(name):
        raise ModelLoadError(f"model path {name!r} does not exist (or is not a directory); "
                             "pass a directory written by save_pretrained, or a hub id.")


def model_fingerprint(model, revision: str | None = None) -> dict:
    """Identifies a model in the manifest: name (its hub id, or its local directory's name:
    no absolute path reaches the manifest or the card), class, revision (the commit the hub
    resolved, else the `revision` asked for) and a hash of its config."""
    config = model.config.to_json_string(use_diff=False)
    return {
        "name_or_path": _path_free(str(getattr(model, "name_or_path", "") or "")),
        "class": type(model).__name__,
        "revision": str(getattr(model.config, "_commit_hash", None) or revision or ""),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
    }


def _path_free(name: str) -> str:
    """A hub id as it is; a local path -> its directory's name."""
    return model_id({"name_or_path": name}) if name else ""


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer: its backend's vocabulary, model and rules. Not its
    truncation and padding state, which calling the tokenizer changes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest = _backend_sha256(backend.to_str())
    else:
        digest = hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    return {
        "name_or_path": _path_free(str(getattr(tokenizer, "name_or_path", "") or "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "sha256": digest,
    }


@functools.lru_cache(maxsize=4)
def _backend_sha256(serialized: str) -> str:
    """The sha256 of a fast tokenizer's state (its `to_str()`), less its truncation and
    padding, in sorted-key JSON. Remembered by the serialized state itself: parsing and
    re-encoding a 50k vocabulary was a third of a one-document capture's fixed cost."""
    state = json.loads(serialized)
    state.pop("truncation", None), state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def model_max_positions(model, tokenizer) -> int | None:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


def resolve_context_size(context_size, model, tokenizer) -> int:
    limit = model_max_positions(model, tokenizer)
    if context_size is None:
        return min(limit or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise ConfigError(f"context_size must be a positive integer, got {context_size!r}.")
    if limit is not None and context_size > limit:
        raise ConfigError(f"context_size={context_size} is larger than the model supports "
                          f"({limit} positions); use --context-size {limit} or less, and "
                          "overflow='chunk' to keep long documents whole.")
    return context_size


def modules(model, *, tokenizer=None, device=None, trust_remote_code: bool = False):
    """List every capturable module of `model` as `(name, type, output shape)` tuples.

    The shape comes from a probe forward of 2 short sequences: a `(2, seq, d)` tuple for
    the modules `capture` can record (one d-vector per token of each sequence); a string
    for the others (their output's shape or type and why not: e.g. GPT-2's
    `transformer.wpe` returns one row for the whole batch); `None` for modules that did
    not run. Names are what `capture(modules=...)` accepts.

    >>> for name, kind, shape in crowstream.modules("gpt2"):  # doctest: +SKIP
    ...     print(name, kind, shape)
    transformer.h.0 GPT2Block (2, 6, 768)
    """
    from crowstream.pipeline.probe import probe_ids, capturable, probe_shapes

    model, tokenizer = load_model(model, tokenizer, device=device,
                                  trust_remote_code=trust_remote_code)
    shapes = probe_shapes(model, tokenizer)
    tokens = probe_ids(tokenizer, model).shape[1]

    def shown(shape):
        if shape is None or isinstance(shape, str) or capturable(shape, tokens):
            return shape
        return f"{shape}: not one vector per token of each sequence"

    return [(name, type(module).__name__, shown(shapes.get(name)))
            for name, module in model.named_modules() if name]
