"""A content-keyed cache of chat completions: one JSON file per (model, template, messages, parameters).

One file per entry rather than a shared sqlite file, because the writers are threads of one process and
separate processes (sweep jobs on a shared file system, where sqlite's locking is unreliable), and because an
entry never changes once written: the same key always means the same request, so two writers racing on one key
write the same answer and either file may win. Each file is written to a temporary name in the same folder and
moved into place with `os.replace`, which is atomic on POSIX: a reader sees the whole entry or none, and a crash
leaves at most a stray `.tmp` file, never a truncated entry.

The answer is stored as the raw text the model returned; turning it into a label happens after reading, so a
change to the parser never needs the model again, and an answer the parser cannot read stays what it was.
Failed requests are not stored: a rerun asks them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Part of every key: a change to what an entry means (not to its layout on disk) must not reuse old entries.
CACHE_FORMAT = 1


def request_key(model: str, template: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """The sha256 naming one request: the model's identity, the prompt template's id and version, the exact
    messages and the sampling parameters, serialised canonically (sorted keys, no whitespace variation)."""
    payload = {
        "format": CACHE_FORMAT,
        "model": model,
        "template": template,
        "messages": [dict(m) for m in messages],
        "params": dict(params),
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0


class JudgeCache:
    """Cached answers under `root`, as `root/<key[:2]>/<key>.json` (two-level, so no folder holds a
    million files). Safe to share between threads and processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.stats = CacheStats()
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored answer (`content`, `finish_reason`, ...) for `key`, or None when there is none."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            answer = entry["answer"]
        except FileNotFoundError:
            answer = None
        except (OSError, ValueError, KeyError, TypeError) as error:
            # Atomic writes make this unreachable by a crash; a hand-edited or foreign file is treated as absent
            # and overwritten by the next answer.
            log.warning("judge cache: ignoring unreadable entry %s (%s)", path, error)
            answer = None
        with self._lock:
            if answer is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
        return answer

    def put(self, key: str, request: Mapping[str, Any], answer: Mapping[str, Any]) -> None:
        """Store `answer` for `key`, with the request it answers (for reading the cache by eye)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "request": dict(request), "answer": dict(answer), "written": time.time()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(entry, handle, ensure_ascii=False, indent=1)
                handle.flush()
                # Without fsync a power loss after the rename can leave an empty file under the final name.
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        with self._lock:
            self.stats.writes += 1

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0
