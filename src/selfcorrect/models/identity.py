"""What a backend's identity is made of: the content of its weights and the build that computes with them.

A run id and the response cache key include the backend's identity, so it must change whenever the replies
could. A file name and size do not: a checkpoint trained again and saved over the old one keeps both. So a
local model file is named by a hash of its bytes. Hashing a model of several GB takes a while, so the hash is
kept in a small cache file keyed by the file's path, size, modification and change times and inode, and
computed again only when one of them changes. Data files are named the same way (tasks/base.py).

The same GGUF also answers differently on different llama.cpp builds and CPUs (on one Intel machine the same
greedy workload gave 10,319 completion tokens with an AVX2 build and 10,788 with an AVX-512 one), so a
llama.cpp model's identity also names the llama.cpp version and the instruction sets it computes with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..errors import UserError
from ..files import write_atomically


def hash_cache_path() -> Path:
    """$SELFCORRECT_HASH_CACHE, else $XDG_CACHE_HOME/selfcorrect/file_hashes.json (~/.cache/...)."""
    if os.environ.get("SELFCORRECT_HASH_CACHE"):
        return Path(os.environ["SELFCORRECT_HASH_CACHE"]).expanduser()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "selfcorrect" / "file_hashes.json"


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of the file's bytes, cached by path, size, mtime, inode and
    ctime (a copy that keeps the mtime, as `cp -p` and rsync do, still gets a new inode or ctime)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"
    cache_file = hash_cache_path()
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}  # no cache yet, or a damaged one: it is only a cache, so start again
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    known[key] = digest.hexdigest()[:16]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache_file, json.dumps(known))  # a concurrent reader never sees half a file
    except (OSError, UserError):
        pass  # a read-only home: the hash is right, only computed again next time
    return known[key]


def files_digest(paths: list[Path]) -> str:
    """One digest for several files (a model directory's weights), from their names and content hashes."""
    parts = [f"{path.name}={file_digest(path)}" for path in sorted(paths)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def llama_cpp_build() -> str:
    """The llama-cpp-python version and the CPU instruction sets its llama.cpp computes with, e.g.
    'llama.cpp-0.3.36[AVX,AVX2,F16C,FMA,SSE3,SSSE3]'."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="ignore")
    # "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | ... |": the features that are on, in a stable order.
    features = sorted({name for name, on in re.findall(r"([A-Z][A-Z0-9_]*) = (\d)", info) if on == "1"})
    return f"llama.cpp-{llama_cpp.__version__}[{','.join(features)}]"
