"""Files gfattn writes: atomic, safe under concurrent writers, and clear when the disk is full.

One owner for two things every stage needs (JSON-safe copies live one layer down, in `store.jsonsafe`,
and are re-exported here):

- `atomic_write_*` and `staging_dir`: a file or directory appears complete under its final name or not
  at all. Temporary names are unique per writer (`tempfile`), so two processes filling one cache never
  collide; for content-addressed caches (`replace=False`) the first complete copy wins and a later one
  is discarded, since both hold the same content;
- `DiskFullError`: an `OSError` of ENOSPC, EDQUOT or EFBIG while writing becomes one line that names the
  path, after the temporary files are removed.

The standard library has no atomic directory publish and `tempfile` leaves its files behind on error,
hence this small module.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from store.jsonsafe import dumps, json_default, plain  # noqa: F401  (re-exported)

_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(OSError):
    """The disk (or quota, or file-size limit) ran out while writing `path`; temporary files are gone."""

    def __init__(self, path: os.PathLike | str, cause: OSError | None = None):
        self.path = Path(path)
        why = cause.strerror if cause is not None and cause.strerror else "no space left on device"
        self.why = why
        super().__init__(
            errno.ENOSPC,
            f"out of disk space writing {self.path} ({why}); free space there "
            f"(or move the store and its .gfattn-cache) and resume the run",
        )

    def __str__(self) -> str:
        return self.args[1]


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError that means no room to write (also when wrapped by h5py or datasets)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
            return True
        text = str(exc).lower()
        if "no space left" in text or "disk quota exceeded" in text or "file too large" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def disk_errors(path: os.PathLike | str) -> Iterator[None]:
    """Turn a disk-full error raised inside the block into a `DiskFullError` naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(path, exc if isinstance(exc, OSError) else None) from None
        raise


# ------------------------------------------------------------------------------------------ atomic files
def _prefix(path: Path) -> str:
    # the writer's pid in the name lets `remove_stale_temporaries` tell a dead writer's leftovers apart
    return f".{path.name}.{os.getpid()}."


def _unique_sibling(path: Path, suffix: str = ".tmp") -> Path:
    fd, name = tempfile.mkstemp(prefix=_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> Path:
    """Write `data` to a unique temporary sibling, fsync it and rename it over `path`."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _unique_sibling(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: os.PathLike | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: os.PathLike | str, obj: Any, *, indent: int | None = 1) -> Path:
    return atomic_write_text(path, dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_file(path: os.PathLike | str) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that needs a file name (h5py, pickle, torch.save);
    renamed over `path` when the block succeeds, removed when it fails."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _unique_sibling(path, suffix=".tmp" + path.suffix)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_h5ad_atomic(adata, out: os.PathLike | str) -> Path:
    """`adata.write_h5ad` through a temporary file: no half-written .h5ad under `out`, ever."""
    out = Path(out)
    needed = _h5ad_size_estimate(adata)
    free = _free_bytes(out.parent if out.parent.exists() else Path.cwd())
    if needed is not None and free is not None and needed > free:
        # h5py handles a full disk badly (it may crash the process while closing the file): refuse first
        raise DiskFullError(out, OSError(errno.ENOSPC, f"needs about {needed >> 20} MiB, {free >> 20} MiB free"))
    with atomic_file(out) as tmp:
        adata.write_h5ad(tmp)
    return out


def cached_h5ad(folder: os.PathLike | str, make, *, what: str = "cached data") -> Path:
    """An .h5ad cache entry: `<folder>/<folder name>.h5ad` beside the folder's manifest, made by `make()`
    (an AnnData) once and verified against the manifest on every reuse: a missing manifest or a changed
    file is an `InputError` naming the folder, never a quiet reuse."""
    from pipeline.errors import InputError

    folder = Path(folder)
    path = folder / f"{folder.name}.h5ad"
    fix = "delete the folder to make it again"
    if folder.is_dir():
        if not (folder / MANIFEST).is_file():
            raise InputError(f"{what} {folder} has no {MANIFEST}; {fix}")
        verify_manifest(folder, what=what, fix=fix)
        return path
    adata = make()
    try:
        with staging_dir(folder, replace=False) as tmp:
            write_h5ad_atomic(adata, tmp / path.name)
            write_manifest(tmp)
    except DiskFullError as exc:  # name the cache entry, not its temporary folder (already removed)
        raise DiskFullError(path, OSError(errno.ENOSPC, exc.why)) from None
    return path


def _h5ad_size_estimate(adata) -> int | None:
    """An upper estimate of an .h5ad's size: every matrix (X, layers, obsm, varm, obsp), obs and var as
    pandas holds them, a quarter more for HDF5's own structures, and 4 MiB."""

    def matrix(x) -> int:
        if hasattr(x, "nnz"):
            return int(x.nnz) * (x.data.itemsize + x.indices.itemsize) + int(x.shape[0] + 1) * x.indptr.itemsize
        if hasattr(x, "memory_usage"):  # a DataFrame in obsm
            return int(x.memory_usage(deep=True).sum())
        return int(np.asarray(x.shape).prod()) * int(np.asarray(x).dtype.itemsize)

    try:
        total = matrix(adata.X) if adata.X is not None else 0
        for mapping in (adata.layers, adata.obsm, adata.varm, adata.obsp, adata.varp):
            total += sum(matrix(v) for v in mapping.values())
        total += int(adata.obs.memory_usage(deep=True).sum()) + int(adata.var.memory_usage(deep=True).sum())
        total += len(json.dumps(plain(dict(adata.uns)), default=str)) if len(adata.uns) else 0
        return int(total * 1.25) + (4 << 20)
    except Exception:
        return None


def _free_bytes(path: Path) -> int | None:
    """Free bytes where `path` lives, or the process's file-size limit (RLIMIT_FSIZE) if smaller."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        free = None
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and limit >= 0:
            free = limit if free is None else min(free, limit)
    except (ImportError, OSError, ValueError):
        pass
    return free


@contextlib.contextmanager
def staging_dir(out: os.PathLike | str, *, replace: bool = True) -> Iterator[Path]:
    """A unique temporary sibling directory of `out`, published as `out` when the block succeeds.

    `replace=True` swaps out whatever is at `out`; `replace=False` (content-addressed caches) keeps a
    complete `out` another writer published first and drops this one. On failure the temporary directory
    and any parent folders this call created are removed.
    """
    out = Path(out)
    created: list[Path] = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    with disk_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out), suffix=".tmp", dir=out.parent))
    ok = False
    try:
        with disk_errors(out):
            yield tmp
            publish_dir(tmp, out, replace=replace)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for d in created:  # innermost first
                try:
                    d.rmdir()
                except OSError:
                    break


def publish_dir(tmp: Path, out: Path, *, replace: bool = True) -> None:
    """Rename the complete directory `tmp` to `out` (see `staging_dir`)."""
    if out.exists() and not replace:
        return  # another writer finished first; its copy is equivalent
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=_prefix(out), suffix=".old", dir=out.parent))
        os.rmdir(old)
        try:
            os.rename(out, old)
        except FileNotFoundError:
            old = None
        try:
            os.rename(tmp, out)
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and out.is_dir():
            if replace:
                publish_dir(tmp, out, replace=True)
            return  # lost the race to an equivalent copy
        raise


def remove_stale_temporaries(folder: os.PathLike | str) -> int:
    """Remove the temporary files and folders (`.NAME.PID.*.tmp*`) of writers on this host that are no
    longer alive, e.g. killed mid-write or crashed on a full disk; returns how many were removed."""
    import re

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    pattern = re.compile(r"^\..+\.(\d+)\.[^.]+\.(tmp|old)")
    for p in folder.glob(".*"):
        m = pattern.match(p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            n += 1
        except OSError:
            pass
    return n


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------- manifests
MANIFEST = "gfattn_manifest.json"


def folder_files(folder: os.PathLike | str) -> dict[str, dict]:
    """Relative path -> sha256 and size of every file below `folder` (the manifest itself left out)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def digest(obj: Any) -> str:
    """A cache key: the first 16 hex digits of the sha256 of `obj`'s sorted JSON."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def folder_hash(folder: os.PathLike | str) -> str:
    """One sha256 over a folder's file names and contents (the data hash of a dataset directory)."""
    import hashlib

    return hashlib.sha256(json.dumps(folder_files(folder), sort_keys=True).encode()).hexdigest()


def write_manifest(folder: os.PathLike | str) -> Path:
    """Record the sha256 and size of every file in a cache folder (`gfattn_manifest.json`)."""
    return atomic_write_json(Path(folder) / MANIFEST, {"files": folder_files(folder)})


def verify_manifest(
    folder: os.PathLike | str, *, what: str = "cache", fix: str = "delete the folder to rebuild it"
) -> None:
    """Check a cache folder against its manifest; a missing, changed or extra-missing file is an error
    naming the folder and what to do (`fix`). A folder without a manifest (written by an older gfattn)
    gets one now."""
    from pipeline.errors import InputError

    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        write_manifest(folder)
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, OSError):
        raise InputError(f"{what} {folder} has a damaged {MANIFEST}; {fix}") from None
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            raise InputError(f"{what} {folder} does not match its manifest ({rel} is missing or changed); {fix}")


def sha256_file(path: os.PathLike | str) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
