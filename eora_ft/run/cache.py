"""Content-addressed cache of compression and initialization artifacts.

An entry is a directory ``<root>/<key>/`` holding what one stage built (:mod:`eora_ft.run.artifacts`: a
compressed ``base/``, or an initial adapter ``init/`` that names its base entry) and ``meta.json``
(per-layer errors, calibration tokens, timings), sealed by ``manifest.json`` (size and sha256 of every
file), which is written last. The key is a sha256 over the *contents* that determine the artifacts:
the model's files (or the hub commit), the calibration token ids, the settings.

Building happens in a temp directory renamed into place, under an exclusive file lock, so two jobs
never race on one entry and a killed build leaves no half entry. An entry whose manifest is missing
or whose files do not match it is treated as absent and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from eora_ft.utils.atomic import current_umask, raise_if_disk_full

logger = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when the entry layout or what the key covers changes (3: base and init entries apart)
MANIFEST, META = "manifest.json", "meta.json"
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken")


def default_cache_dir() -> Path:
    """``$EORA_FT_CACHE``, else ``$XDG_CACHE_HOME/eora_ft``, else ``~/.cache/eora_ft``."""
    if os.environ.get("EORA_FT_CACHE"):
        return Path(os.environ["EORA_FT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eora_ft"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike | None, commit_hash: str | None = None) -> dict:
    """What identifies a checkpoint's contents: the hub commit, or sha256 of each weight/config/tokenizer file."""
    if commit_hash:
        return {"commit": commit_hash}
    directory = Path(model_dir)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES
                   and not p.name.startswith("."))
    return {"files": {str(p.relative_to(directory)): sha256_file(p) for p in files}}


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (e.g. the calibration token ids)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def cache_key(parts: dict) -> str:
    """sha256 of ``parts`` as canonical JSON (sorted keys), prefixed with the cache format."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _manifest(directory: Path) -> dict:
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


def check_entry(entry: Path, verify_hashes: bool = True) -> str | None:
    """None if ``entry`` is complete and intact, else why not (missing manifest, a file changed...)."""
    if not (entry / MANIFEST).is_file():
        return "no manifest (never finished)" if entry.exists() else "absent"
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"unreadable manifest: {err}"
    for name, expected in manifest.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if verify_hashes and sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another job builds the same entry
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_entry(root: str | os.PathLike, key: str, build: Callable[[Path], dict]) -> tuple[Path, bool]:
    """Return ``(entry, built)``: the intact entry for ``key``, building it first if needed.

    ``build(tmp)`` writes the artifacts into ``tmp`` and returns the metadata stored as ``meta.json``.
    A corrupt or unfinished entry is logged, removed and rebuilt. Call on one process only.
    """
    root = Path(root)
    entry = root / key
    with _locked(root, key):
        problem = check_entry(entry)
        if problem is None:
            logger.info("artifact cache hit: %s", entry)
            return entry, False
        if problem != "absent":
            logger.warning("artifact cache entry %s is unusable (%s): rebuilding it", entry, problem)
            shutil.rmtree(entry)
        for stale in root.glob(f".{key}.tmp-*"):  # we hold the lock: no live builder owns these
            logger.warning("removing %s, the remains of a build of this entry that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp gives 0700: a shared cache must stay readable
        try:
            meta = build(tmp)
            (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=2) + "\n")
            os.replace(tmp, entry)
        except OSError as err:
            raise_if_disk_full(err, entry, "artifact cache entry")
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("artifact cache entry written: %s", entry)
    return entry, True


def require_entry(root: str | os.PathLike, key: str) -> Path:
    """The entry for ``key``, which another process has built: checked by size only (the builder hashed it)."""
    entry = Path(root) / key
    problem = check_entry(entry, verify_hashes=False)
    if problem is not None:
        raise RuntimeError(f"artifact cache entry {entry} is not usable ({problem}); the main process should have "
                           "built it: is the cache directory on a file system every rank sees?")
    return entry


def read_meta(entry: Path) -> dict:
    return json.loads((entry / META).read_text())
