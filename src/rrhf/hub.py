"""The one door to the Hugging Face Hub: every model, tokenizer, checkpoint file and data set the configs name.

    python -m rrhf.hub fetch experiment=table6          # download what a config or sweep needs, pin it
    python -m rrhf.hub fetch model=alpaca --update      # move the pins to the repositories' current commits
    HF_HUB_OFFLINE=1 python -m rrhf.hub fetch ...       # list what is missing from the cache, download nothing

A job never downloads. `require(cfg)` (the pipeline's first step) finds every Hub item of the config in the
local Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`), at the commit the config asks for
(`revision` keys) or the lock file pins (`hub.lock.yaml` at the project root, written by `fetch`), else the
cache's `main`; a missing item stops the job at once with the command that fetches it. The loaders then read
the snapshot folders (`snapshot`), and the stage keys name each repository by its commit (`identity`), so a
repository that moves on the Hub is never mixed with cached results of its old commit. The cache layout is
huggingface_hub's own (`snapshot_download`), never re-implemented here.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrhf import PROJECT_ROOT, ConfigError

KINDS = ("model", "dataset")
# What a role needs from a repository: each entry is satisfied by any one of its patterns.
CONFIG = ("config.json",)
WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
DATA = ("*.parquet", "*.jsonl", "*.json.gz", "*.csv", "*.arrow")
# Small files a model or tokenizer may need besides its weights (configs, vocabularies, SentencePiece model).
MODEL_EXTRAS = ("*.json", "*.txt", "*.model")
# A data set's card holds the `configs:` that map files to splits.
DATA_EXTRAS = ("README.md",)
COMMIT = re.compile(r"[0-9a-f]{40}")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class Item:
    """One Hub repository a config reads, what it needs from it, and the config keys that name it."""

    repo_id: str
    kind: str = "model"
    revision: str | None = None  # asked for by the config (branch, tag or commit); None: the lock's, or main
    needs: tuple[tuple[str, ...], ...] = (CONFIG, WEIGHTS, TOKENIZER)
    keys: tuple[str, ...] = ()

    @property
    def lock_key(self) -> str:
        return (
            self.repo_id
            if self.revision in (None, "main") or is_commit(self.revision)
            else f"{self.repo_id}@{self.revision}"
        )

    def describe(self, commit: str | None = None) -> str:
        at = commit or self.revision or "main"
        return f"{self.kind} {self.repo_id}@{at}" + (f" ({', '.join(self.keys)})" if self.keys else "")


class HubItemsMissing(RuntimeError):
    """Hub items a job needs are not in the local cache; the message is one line with the fetch command."""

    def __init__(self, missing: list[tuple[Item, str | None]], command: str) -> None:
        self.missing, self.command = missing, command
        names = "; ".join(item.describe(commit) for item, commit in missing)
        super().__init__(f"not in the Hugging Face cache ({cache_dir()}): {names}. Fetch first: {command}")


def is_commit(revision: str | None) -> bool:
    return bool(revision) and bool(COMMIT.fullmatch(str(revision)))


def is_hub_id(name: Any) -> bool:
    """A Hub repository id ("org/name" or "name"), not a local path or an embedded model."""
    text = str(name)
    if not text or text.startswith(("embedded:", "/", ".", "~")) or ":" in text:
        return False
    return bool(_HUB_NAME.fullmatch(text)) and not Path(text).expanduser().exists()


def cache_dir() -> Path:
    """The Hugging Face cache the jobs read, from the environment at call time (tests point it elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------- the lock file

DEFAULT_LOCK = PROJECT_ROOT / "hub.lock.yaml"


def lock_path() -> Path:
    """`hub.lock.yaml` at the project root (RRHF_HUB_LOCK names another)."""
    return Path(os.environ.get("RRHF_HUB_LOCK") or DEFAULT_LOCK).expanduser()


def _lock_error(path: Path, line: int | None, problem: str) -> ValueError:
    # The config checks' error type: run.py and the collator treat a bad lock like any other bad config.
    return ConfigError(f"{path}{f':{line}' if line else ''}: {problem}")


def read_lock(path: Path | None = None, *, create: bool = False) -> dict[str, dict[str, str]]:
    """{"model": {lock key: commit}, "dataset": {...}}, read through the lock file's schema.

    The file is a mapping with `models` and `datasets` only, each a mapping of repository id (`id` or
    `id@revision`) to a 40-character commit; every other shape is a ConfigError naming the file, line and key.
    No file at the default path means no pins; a lock named by RRHF_HUB_LOCK or `path` must exist, unless
    `create` (fetch, which writes it), since a mistyped name would silently load `main` instead of the pins.
    """
    import yaml

    named = path is not None or bool(os.environ.get("RRHF_HUB_LOCK"))
    path = Path(path).expanduser() if path is not None else lock_path()
    lock: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
    if not path.exists():
        if named and not create:
            raise _lock_error(
                path,
                None,
                "no such lock file (named by RRHF_HUB_LOCK or --lock); write it with "
                "`python -m rrhf.hub fetch <overrides> --lock <file>`, or unset "
                f"RRHF_HUB_LOCK to read {DEFAULT_LOCK} (no file there: no pins)",
            )
        return lock
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError) as error:
        raise _lock_error(path, None, f"cannot be read as a lock file: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise _lock_error(path, mark.line + 1 if mark else None, f"not valid YAML: {problem}") from None
    if root is None or _scalar(root) == ("null", None):  # an empty file pins nothing
        return lock
    sections = {f"{kind}s": kind for kind in KINDS}
    for key, value in _entries(path, root, "the top level"):
        if key.value not in sections:
            raise _lock_error(
                path,
                key.start_mark.line + 1,
                f"{key.value!r}: not a key of a lock file; expected {' and '.join(sections)}",
            )
        kind = sections[key.value]
        if _scalar(value) == ("null", None):  # `models:` with nothing under it
            continue
        for repo, commit in _entries(path, value, key.value):
            line = repo.start_mark.line + 1
            name = repo.value.split("@", 1)[0]
            if not _HUB_NAME.fullmatch(name):
                raise _lock_error(
                    path,
                    line,
                    f"{key.value}.{repo.value}: not a Hub repository id (org/name or "
                    "name, with @revision where a config names one)",
                )
            tag, text = _scalar(commit)
            if tag != "str" or not is_commit(text):
                got = repr(text) if tag else "a list" if isinstance(commit, yaml.SequenceNode) else "a mapping"
                raise _lock_error(
                    path,
                    commit.start_mark.line + 1,
                    f"{key.value}.{repo.value}: {got} is not a 40-character commit hash",
                )
            lock[kind][repo.value] = text
    return lock


def _scalar(node: Any) -> tuple[str, Any]:
    """A YAML node's resolved type ("str", "int", "null", ...) and its text; ("", None) for a non-scalar."""
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        return "", None
    tag = node.tag.rsplit(":", 1)[-1]
    return tag, (None if tag == "null" else node.value)


def _entries(path: Path, node: Any, where: str) -> list[tuple[Any, Any]]:
    """The (key, value) nodes of a YAML mapping whose keys are strings, each once; else the line and why."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        shape = "a list" if isinstance(node, yaml.SequenceNode) else f"the value {_scalar(node)[1]!r}"
        raise _lock_error(path, node.start_mark.line + 1, f"{where}: expected a mapping, got {shape}")
    seen: dict[str, int] = {}
    for key, _ in node.value:
        line = key.start_mark.line + 1
        if _scalar(key)[0] != "str":
            raise _lock_error(path, line, f"{where}: key {_scalar(key)[1]!r} is not a string")
        if key.value in seen:
            raise _lock_error(path, line, f"{where}: {key.value!r} appears twice (lines {seen[key.value]} and {line})")
        seen[key.value] = line
    return list(node.value)


def write_lock(lock: dict[str, dict[str, str]], path: Path | None = None) -> Path:
    import yaml

    path = path or lock_path()
    header = (
        "# Written by `python -m rrhf.hub fetch`: the commit of every Hugging Face Hub repository the\n"
        "# configs read. Keep it with the project: jobs load exactly these commits (a `revision` in a\n"
        "# config wins); `fetch --update` moves them to the repositories' current commits.\n"
    )
    body = yaml.safe_dump({f"{kind}s": dict(sorted(lock[kind].items())) for kind in KINDS}, sort_keys=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(header + body)
    os.replace(tmp, path)
    return path


def wanted_commit(item: Item, lock: dict[str, dict[str, str]] | None = None) -> str | None:
    """The commit a job must load: the config's when it names one, else the lock's (None: the cache's ref)."""
    if is_commit(item.revision):
        return item.revision
    lock = read_lock() if lock is None else lock
    return lock[item.kind].get(item.lock_key)


# ------------------------------------------------------------------------------------- reading the cache


@dataclass
class _Pins:
    """The items `require` resolved for the running job: the loaders read these folders and commits."""

    folders: dict[tuple[str, str], tuple[Path, str]] = field(default_factory=dict)


_PINS = _Pins()


def _local_snapshot(item: Item, commit: str | None) -> tuple[Path, str]:
    """The cached snapshot folder of an item and its commit, read without any network access."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # No patterns: the needs are alternatives (safetensors or .bin), checked below, not a list of files.
        folder = Path(
            snapshot_download(
                item.repo_id,
                repo_type=item.kind,
                revision=commit or item.revision or "main",
                cache_dir=cache_dir(),
                local_files_only=True,
                allow_patterns=[],
            )
        )
    except (LocalEntryNotFoundError, OSError) as error:
        raise FileNotFoundError(item.describe(commit)) from error
    unmet = [need for need in item.needs if not _has(folder, need)]
    if unmet:
        raise FileNotFoundError(f"{item.describe(commit)}: no file matching {' or '.join(unmet[0])}")
    return folder, folder.name


def _has(folder: Path, patterns: Iterable[str]) -> bool:
    names = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    return any(
        fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(Path(name).name, pattern)
        for pattern in patterns
        for name in names
    )


def snapshot(repo_id: str, kind: str = "model", revision: str | None = None) -> Path:
    """The local folder of a Hub repository at the commit the running job pinned (`require`), or at the config's
    revision, the lock's commit or the cache's main. Never downloads; raises HubItemsMissing."""
    if (kind, repo_id) in _PINS.folders and revision is None:
        return _PINS.folders[kind, repo_id][0]
    item = Item(repo_id, kind, revision, needs=())
    commit = wanted_commit(item)
    try:
        return _local_snapshot(item, commit)[0]
    except FileNotFoundError:
        raise HubItemsMissing([(item, commit)], fetch_command()) from None


def commit_of(repo_id: str, kind: str = "model") -> str:
    """The commit of a Hub repository as the running job reads it."""
    if (kind, repo_id) in _PINS.folders:
        return _PINS.folders[kind, repo_id][1]
    return snapshot(repo_id, kind).name


def identity(repo_id: str, kind: str = "model") -> str:
    """How a stage key names a Hub repository: its id at the commit read."""
    return f"{repo_id}@{commit_of(repo_id, kind)}"


# ------------------------------------------------------------------------------------------- the manifest


def _revision(node: Any, key: str) -> str | None:
    value = node.get(key) if node is not None else None
    return str(value) if value not in (None, "") else None


def manifest(cfg: Any) -> list[Item]:
    """Every Hub item a composed run config reads, with the config keys that name it."""
    items: list[Item] = []

    def add(name: Any, kind: str, revision: str | None, needs: tuple[tuple[str, ...], ...], key: str) -> None:
        if name is not None and is_hub_id(name):
            items.append(Item(str(name), kind, revision, needs, (key,)))

    model, task, reward, method, e = cfg.model, cfg.task, cfg.reward, cfg.method, cfg.eval
    add(model.path, "model", _revision(model, "revision"), (CONFIG, WEIGHTS, TOKENIZER), "model.path")
    if model.get("sft"):  # a policy fine-tuned on demand (rrhf.pipeline.initial_policy)
        add(model.sft.get("source"), "dataset", _revision(model.sft, "source_revision"), (DATA,), "model.sft.source")
    add(e.judge, "model", _revision(e, "judge_revision"), (CONFIG, WEIGHTS, TOKENIZER), "eval.judge")
    if e.get("pairwise"):  # eval=pairwise_judge: its question set (e.g. Vicuna's 80) and a local judge model
        pairwise = e.pairwise
        add(
            pairwise.questions, "dataset", _revision(pairwise, "questions_revision"), (DATA,), "eval.pairwise.questions"
        )
        if not pairwise.judge.get("base_url"):
            add(pairwise.judge.model, "model", None, (CONFIG, WEIGHTS, TOKENIZER), "eval.pairwise.judge.model")
    if reward.name == "gptj_rm_static":
        add(
            reward.checkpoint_repo,
            "model",
            _revision(reward, "revision"),
            ((reward.checkpoint_file,),),
            "reward.checkpoint_repo",
        )
        add(reward.backbone, "model", _revision(reward, "backbone_revision"), (CONFIG,), "reward.backbone")
        add(reward.tokenizer, "model", _revision(reward, "tokenizer_revision"), (TOKENIZER,), "reward.tokenizer")
    elif reward.get("path"):
        add(reward.path, "model", _revision(reward, "revision"), (CONFIG, WEIGHTS, TOKENIZER), "reward.path")
    add(task.get("source"), "dataset", _revision(task, "revision"), (DATA,), "task.source")
    sampling = cfg.get("sampling") or {}
    for name, spec in (sampling.get("sources") or {}).items() if sampling.get("generator") == "sources" else ():
        if spec is None:  # sampling=sources: a local policy, or a model served here for an endpoint source
            continue
        if spec.get("kind") == "policy" or (spec.get("kind") == "endpoint" and not spec.get("base_url")):
            add(spec.get("model"), "model", None, (CONFIG, WEIGHTS, TOKENIZER), f"sampling.sources.{name}.model")
    prefix = task.get("prefix") or {}
    if prefix.get("rule") == "tokens":
        add(prefix.get("tokenizer"), "model", None, (TOKENIZER,), "task.prefix.tokenizer")
    if method.get("source"):
        add(method.source, "dataset", _revision(method, "source_revision"), (DATA,), "method.source")
    return merge(items)


def merge(items: Iterable[Item]) -> list[Item]:
    """One item per repository: the union of what its roles need; two revisions of one repository are an error."""
    merged: dict[tuple[str, str], Item] = {}
    for item in items:
        key = (item.kind, item.repo_id)
        have = merged.get(key)
        if have is None:
            merged[key] = item
            continue
        if (have.revision or "main") != (item.revision or "main"):
            raise ValueError(
                f"{item.kind} {item.repo_id}: {', '.join(have.keys)} ask for revision "
                f"{have.revision or 'main'}, {', '.join(item.keys)} for {item.revision or 'main'}"
            )
        needs = have.needs + tuple(n for n in item.needs if n not in have.needs)
        keys = have.keys + tuple(k for k in item.keys if k not in have.keys)
        merged[key] = Item(item.repo_id, item.kind, have.revision, needs, keys)
    return list(merged.values())


def fetch_command() -> str:
    """The command that fetches the running job's Hub items: its own overrides after `fetch`."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        overrides = ["<the run's overrides>"]
    return " ".join(["python -m rrhf.hub fetch", *overrides]).strip()


def require(cfg: Any) -> dict[str, str]:
    """Find every Hub item of a run config in the local cache and pin it for the loaders; {repo: commit}.

    Raises HubItemsMissing, naming every missing item, before any stage does work.
    """
    _PINS.folders.clear()
    items = manifest(cfg)
    missing: list[tuple[Item, str | None]] = []
    found: dict[str, str] = {}
    # A job without a Hub item never reads the lock: a broken lock file cannot stop it.
    lock = read_lock() if items else {kind: {} for kind in KINDS}
    for item in items:
        commit = wanted_commit(item, lock)
        try:
            folder, resolved = _local_snapshot(item, commit)
        except FileNotFoundError:
            missing.append((item, commit))
            continue
        _PINS.folders[item.kind, item.repo_id] = (folder, resolved)
        found[item.repo_id] = resolved
    if missing:
        raise HubItemsMissing(missing, fetch_command())
    return found


# ------------------------------------------------------------------------------------------ fetching


def _download_patterns(item: Item, files: list[str]) -> list[str]:
    """The repository's files an item needs: what its roles match (safetensors weights in preference to .bin,
    no other framework's weights), plus the small files beside them."""
    wanted: list[str] = []
    for need in item.needs:
        patterns = need
        if need == WEIGHTS and any(fnmatch.fnmatch(f, "*.safetensors") for f in files):
            patterns = ("*.safetensors",)
        wanted += patterns
    named = all(need in (CONFIG, WEIGHTS, TOKENIZER, DATA) for need in item.needs)
    extras = DATA_EXTRAS if item.kind == "dataset" else MODEL_EXTRAS if named else ()
    return wanted + list(extras)


def fetch(items: list[Item], *, update: bool = False, lock_file: Path | None = None) -> list[tuple[Item, str, Path]]:
    """Download every item at its pinned commit (the config's revision, else the lock's unless `update`, else
    the repository's current one) into the cache the jobs read, and record repo -> commit in the lock file."""
    from huggingface_hub import HfApi, snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint)
    lock = read_lock(lock_file, create=True)  # fetch writes the lock: a named one need not exist yet
    done = []
    for item in items:
        pinned = item.revision if is_commit(item.revision) else None if update else lock[item.kind].get(item.lock_key)
        info = api.repo_info(item.repo_id, repo_type=item.kind, revision=pinned or item.revision or "main")
        files = [s.rfilename for s in info.siblings or []]
        patterns = _download_patterns(item, files)
        # With safetensors weights, the index of the .bin shards left behind would only mislead a reader.
        ignore = ["*.bin.index.json"] if any(fnmatch.fnmatch(f, "*.safetensors") for f in files) else None
        folder = Path(
            snapshot_download(
                item.repo_id,
                repo_type=item.kind,
                revision=info.sha,
                cache_dir=cache_dir(),
                allow_patterns=patterns,
                ignore_patterns=ignore,
                endpoint=endpoint,
            )
        )
        unmet = [need for need in item.needs if not _has(folder, need)]
        if unmet:
            raise FileNotFoundError(
                f"{item.describe(info.sha)}: the repository has no file matching "
                f"{' or '.join(unmet[0])} (needed by {', '.join(item.keys)})"
            )
        lock[item.kind][item.lock_key] = info.sha
        done.append((item, info.sha, folder))
    write_lock(lock, lock_file)
    return done


def compose_jobs(overrides: list[str]) -> list[Any]:
    """The composed config of every job a command line makes: one, or each job of a sweep (the command's
    comma-separated values and an experiment's `hydra.sweeper.params`), as `python run.py -m` would run them."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import rrhf  # noqa: F401  (registers the config resolvers)

    parser = OverridesParser.create()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        plain = [o for o in overrides if not parser.parse_override(o).is_sweep_override()]
        base = compose("config", overrides=plain, return_hydra_config=True)
        params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
        # As Hydra's basic sweeper: the config's sweep first, the command line's values replacing its keys.
        arguments = parser.parse_overrides(params + list(overrides))
        jobs = BasicSweeper.split_arguments(arguments, None)[0]
        configs = []
        for job in jobs:
            cfg = compose("config", overrides=list(job), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            configs.append(cfg)
        return configs


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rrhf.hub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help="download (or, offline, list the missing) Hub items of a config or sweep")
    get.add_argument("overrides", nargs="*", help="Hydra overrides, as given to run.py (sweeps expand)")
    get.add_argument("--update", action="store_true", help="re-resolve unpinned revisions (moves the lock)")
    get.add_argument("--lock", type=Path, default=None, help=f"lock file (default {lock_path()})")
    args = parser.parse_args(argv)
    if args.lock:
        os.environ["RRHF_HUB_LOCK"] = str(args.lock.resolve())
    configs = compose_jobs(args.overrides)
    items = merge(item for cfg in configs for item in manifest(cfg))
    print(f"{len(configs)} job(s), {len(items)} Hub item(s); cache {cache_dir()}; lock {lock_path()}")
    if not items:
        return 0
    if offline():
        lock, missing = read_lock(create=True), 0
        for item in items:
            commit = wanted_commit(item, lock)
            try:
                folder, resolved = _local_snapshot(item, commit)
                print(f"  present  {item.describe(resolved)}")
            except FileNotFoundError as error:
                missing += 1
                print(f"  MISSING  {error}")
        if missing:
            print(f"{missing} missing; HF_HUB_OFFLINE is set, so nothing was downloaded: run this command online")
        return 1 if missing else 0
    for item, commit, folder in fetch(items, update=args.update):
        print(f"  {item.describe(commit)}: {_size(folder) / 2**20:.1f} MiB in {folder}")
    print(f"lock written: {lock_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
