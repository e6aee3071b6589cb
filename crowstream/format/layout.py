"""The output directory's layout. It owns every name in OUT (directories, the manifest,
commit records, part files, module partitions) and the format version, so the writer,
recovery and every reader build paths one way. Nothing here touches the disk.
"""

from __future__ import annotations

import os
import re

from crowstream.checks import looks_like_path
from crowstream.errors import ConfigError

FORMAT_VERSION = 3  # 0.3; 1 (0.1) and 2 (0.2) still read


MANIFEST_NAME = "crowstream.json"


TMP_DIR = ".tmp"


DATA_DIR = "data"


DOCS_DIR = "docs"


COMMITS_DIR = "commits"  # one record (+ partial statistics) per committed shard


VOCAB_NAME = "vocab.parquet"


TOKENIZER_DIR = "tokenizer"


# Row-group size and the Parquet settings live in schemas/rows.json (the format's single
# source of truth): ~16 MiB, because huge row groups made selective reads 8-60x slower.
# Part files roll over at this many raw (uncompressed) bytes, always at a row-group
# boundary: 512 MiB raw is ~200-450 MB on disk after zstd, large enough that listing and
# opening files (tens of ms per request on object storage) stays cheap against reading
# them, small enough that one file is a quick download and a shard may hold several.
PART_TARGET_BYTES = 512 << 20


_MODULE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


# A module's input is captured under the name `<module>:input` (API, CLI, manifest) and
# stored in `data/module=<module>@input` (colons break paths on Windows and the Hub).
INPUT_SUFFIX = ":input"


INPUT_DIR_SUFFIX = "@input"


def base_module(name: str) -> str:
    """The module a captured name refers to: `<module>:input` -> `<module>`."""
    return name.removesuffix(INPUT_SUFFIX)


GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    """Whether `pattern` is a module-name glob rather than one name."""
    return bool(GLOB_CHARS & set(pattern))


def match_modules(pattern: str, names) -> list[str]:
    """The names among `names` (module names, or captured names: `<module>` and
    `<module>:input`) that `pattern` matches, in their order. In a glob, `*` matches within
    one dotted component (`transformer.h.*` -> the blocks, not their submodules), `**`
    across components, `?` one character, `[...]` a set; a glob ending in `:input` matches
    only inputs, any other only outputs. A pattern that is no glob matches itself."""
    if not is_glob(pattern):
        return [pattern] if pattern in names else []
    base = base_module(pattern)
    suffix = pattern[len(base):]
    pieces = re.split(r"(\*\*|\*|\?|\[[^\]]*\])", base)
    table = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    regex = re.compile("".join(table.get(p) or (p if p.startswith("[") else re.escape(p))
                               for p in pieces))
    return [n for n in names
            if n[len(base_module(n)):] == suffix and regex.fullmatch(base_module(n))]


def check_module_name(name: str) -> None:
    """Module names become directory names: refuse anything that could escape OUT.
    `<module>:input` names a module's input."""
    base = base_module(name)
    if not _MODULE_NAME.fullmatch(base) or ".." in base:
        raise ConfigError(
            f"module name {name!r} cannot be used as a directory name; "
            "use the dotted names that `crowstream modules MODEL` lists."
        )


RECORD_NAME = re.compile(r"shard-(\d{8})\.json")


def manifest_path(out: str) -> str:
    return os.path.join(out, MANIFEST_NAME)


def record_path(index: int) -> str:
    """The commit record of shard `index`, relative to OUT."""
    return f"{COMMITS_DIR}/shard-{index:08d}.json"


RUN_PATH = f"{COMMITS_DIR}/run.json"  # the run's identity, written once at its start


END_PATH = f"{COMMITS_DIR}/end.json"  # where the corpus ends, once a rank has read that far


def stats_path(index: int) -> str:
    """The partial statistics of shard `index`, relative to OUT."""
    return f"{COMMITS_DIR}/shard-{index:08d}.stats.parquet"


def part_name(rank: int, shard: int, seq: int = 0) -> str:
    """File name of part `seq` of one shard (a module may roll over several per shard)."""
    return f"part-{rank:05d}-{shard:06d}-{seq:03d}.parquet"


def module_dir(module: str) -> str:
    """`data/module=<module>`; a module's input `<module>:input` -> `data/module=<module>@input`."""
    if base_module(module) != module:
        module = base_module(module) + INPUT_DIR_SUFFIX
    return f"{DATA_DIR}/module={module}"


def staging_path(out: str, rel: str) -> str:
    """Where the part file that will be committed as `rel` is written: in `.tmp/`, under a
    flat name derived from `rel` (so a resume can roll a committed shard forward)."""
    return os.path.join(out, TMP_DIR, rel.replace("/", "__"))


def config_name(module: str) -> str:
    """The dataset card's config name of a module: its directory name after `module=`
    (`datasets` refuses `:` in config names, so an input is `<module>@input` there)."""
    return module_dir(module).split("=", 1)[1]


LOCKS_DIR = ".locks"  # one lock file per rank of a multi-rank run


CARD_NAME = "README.md"


def model_id(fingerprint: dict) -> str:
    """The model's hub id, or only the NAME of its local directory: part files record
    this, and must neither leak local paths nor differ between two copies of a model."""
    name = fingerprint.get("name_or_path") or fingerprint.get("class") or ""
    if os.path.isabs(name) or looks_like_path(name) or os.path.isdir(name):
        return os.path.basename(os.path.normpath(name))
    return name
