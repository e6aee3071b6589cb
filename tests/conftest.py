"""Shared fixtures: tiny models built locally (no hub access), real text, thread police."""

from __future__ import annotations

import os
import threading

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # a core per pytest-xdist worker: torch's OpenMP threads of several workers (and of
    # their children, which inherit this) would otherwise spin against each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def python_paragraphs(n: int = 200, min_chars: int = 1) -> list[str]:
    """Real text of varied length: paragraphs of Python's own docs, in a fixed order."""
    from crowstream.demo import python_doc_paragraphs

    return python_doc_paragraphs(n, min_chars=min_chars)


def build_tiny_gpt2(path: str, *, n_layer: int = 3, n_embd: int = 64, n_positions: int = 64,
                    tokenizer=None):
    """A GPT-2 with random weights and a BPE tokenizer trained on Python's docs (or
    `tokenizer`, one this function made before: training costs seconds), saved with
    save_pretrained to `path`; -> (model, tokenizer). No pad token, like the real GPT-2."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tokenizer or _tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=n_positions,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(python_paragraphs(400), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-gpt2"))
    build_tiny_gpt2(path)
    return path


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    """(model, tokenizer) of the tiny GPT-2 (3 blocks, d=64, 64 positions, no pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(gpt2_dir).eval(), AutoTokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="session")
def minilm_dir():
    from crowstream.demo import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    """(model, tokenizer) of the real pretrained all-MiniLM-L6-v2 (BERT, d=384)."""
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(minilm_dir).eval(), AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def corpus():
    """120 real paragraphs, from a few characters to well over 64 tokens."""
    return python_paragraphs(120)


@pytest.fixture(autouse=True)
def thread_police():
    """Fail any test that leaves a crowstream background thread running."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("crowstream") and t.is_alive()]
    assert not leaked, f"leaked threads: {leaked}"


@pytest.fixture(scope="session")
def reference_capture(gpt2, corpus, tmp_path_factory):
    """-> get(n, modules, **kw): the path of a capture of the first `n` paragraphs by the
    tiny GPT-2, made once per session for each set of arguments. Tests only read it (or
    copy it before changing anything)."""
    import crowstream as cs

    made = {}

    def get(n: int, modules, **kw) -> str:
        key = (n, tuple(modules), tuple(sorted(kw.items())))
        if key not in made:
            out = str(tmp_path_factory.mktemp(f"reference-{n}") / "out")
            cs.capture(gpt2[0], corpus[:n], list(modules), out, tokenizer=gpt2[1], **kw)
            made[key] = out
        return made[key]

    return get
