"""Where data lives (the data root) and where derived files go (the cache)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from tlframe.data.errors import DataError

DATA_ROOT_ENV = "TLFRAME_DATA_ROOT"
CACHE_DIR_ENV = "TLFRAME_CACHE_DIR"


def candidate_data_root(root: Optional[str] = None) -> Path:
    """The data root that would be used, without checking that it exists."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    return Path("data")


def resolve_data_root(root: Optional[str] = None) -> Path:
    """Return the data root: ``root`` if given, else ``$TLFRAME_DATA_ROOT``, else ``./data``.

    Raises:
        DataError: if the chosen folder does not exist.
    """
    path = candidate_data_root(root)
    if root:
        origin = "the root= argument"
    elif os.environ.get(DATA_ROOT_ENV):
        origin = f"${DATA_ROOT_ENV}"
    else:
        origin = f"the default ./data (neither root= nor ${DATA_ROOT_ENV} is set)"
    if not path.is_dir():
        raise DataError(
            f"data root {path.resolve()} does not exist (taken from {origin}): set "
            f"{DATA_ROOT_ENV} to the folder that holds your data sets or pass root=... "
            "to the domain."
        )
    return path.resolve()


def cache_dir() -> Path:
    """Folder for extracted archives: ``$TLFRAME_CACHE_DIR`` else ``~/.cache/tlframe``.

    Created on demand. The data root itself is never written to.
    """
    env = os.environ.get(CACHE_DIR_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "tlframe"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cache folder {path} cannot be created ({e}): set {CACHE_DIR_ENV} to a "
            "writable folder."
        ) from e
    return path


def extract_tar_once(archive: Path, name: str) -> Path:
    """Extract ``archive`` into ``<cache>/<name>-<key>/`` once and return that folder.

    The key depends on the archive's absolute path, size and modification time, so a
    changed archive is extracted afresh. Extraction goes to a temporary folder next to the
    target that is renamed into place when complete, so an interrupted or concurrent
    extraction never leaves a half-filled folder behind.
    """
    archive = Path(archive).resolve()
    st = archive.stat()
    key = hashlib.sha1(f"{archive}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    base = cache_dir()
    final = base / f"{name}-{key}"
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
    try:
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tf.extractall(tmp)
    except (OSError, tarfile.TarError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"archive {archive} cannot be extracted into {base} ({e}): check that the "
            f"archive is complete and that {CACHE_DIR_ENV} points at a writable folder "
            "with enough space."
        ) from e
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process finished first; use its copy.
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return final


def find_path(path: str, what: str) -> Path:
    """Resolve a user path: as given, else relative to the data root.

    Lets configs say ``root: office_caltech_10/amazon`` with ``$TLFRAME_DATA_ROOT`` set.
    """
    p = Path(path).expanduser()
    if p.exists():
        return p.resolve()
    tried = [str(p.resolve())]
    if not p.is_absolute():
        alt = candidate_data_root(None) / p
        if alt.exists():
            return alt.resolve()
        tried.append(str(alt.resolve()))
    raise DataError(
        f"{what} {path} does not exist (looked at {', '.join(tried)}): pass an existing "
        f"path, or a path relative to the data root (${DATA_ROOT_ENV} or ./data)."
    )
