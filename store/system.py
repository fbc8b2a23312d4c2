"""Facts about the machine the store runs on: network filesystems, process liveness, provenance.

SQLite's WAL mode keeps its index in a memory-mapped `-shm` file and relies on POSIX locks; on NFS,
SMB/CIFS, sshfs, 9p and similar filesystems those are unreliable, and concurrent readers and writers can
corrupt the database (https://www.sqlite.org/wal.html, "WAL does not work over a network filesystem").
The store therefore refuses such paths. `write_blocker` says why a store could not be written (a
read-only mount, file or folder), which decides between a writable and a read-only open. Liveness
checks back the `lost` run status: a run on this host whose process is gone cannot still be running.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
from pathlib import Path

# Filesystem types (as listed in /proc/mounts) on which SQLite WAL is unsafe.
NETWORK_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "nfsd",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "ncpfs",
        "9p",
        "afs",
        "coda",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "davfs",
        "sshfs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "fuse.cephfs",
        "fuse.ceph",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "fuse.juicefs",
        "fuse.davfs",
        "fuse.smbnetfs",
        "fuse.sshfs-fuse",
        "fuse.goofys",
        "fuse.blobfuse",
    }
)

ALLOW_NETWORK_FS_ENV = "GFATTN_STORE_ALLOW_NETWORK_FS"

PACKAGES = ("gfattn", "torch", "transformers", "anndata", "scanpy", "numpy", "pandas", "datasets", "sqlite-utils")


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal (\040 ...)
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: str | os.PathLike, mounts_text: str | None = None) -> str | None:
    """The filesystem type of the mount holding `path` (which need not exist yet), or None if unknown.

    `mounts_text` is the content of /proc/mounts (read from the system when None).
    """
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return None
    p = Path(os.path.abspath(os.fspath(path)))
    # resolve symlinks through the deepest existing ancestor; the rest of the path does not exist yet
    missing: list[str] = []
    while not p.exists() and p != p.parent:
        missing.append(p.name)
        p = p.parent
    target = str(p.resolve().joinpath(*reversed(missing)))
    best, best_type = "", None
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt, fstype = _unescape_mount_field(parts[1]), parts[2]
        prefix = mnt.rstrip("/") + "/"
        if (target == mnt or target.startswith(prefix) or mnt == "/") and len(mnt) >= len(best):
            best, best_type = mnt, fstype
    return best_type


def is_network_filesystem(fstype: str | None) -> bool:
    if not fstype:
        return False
    fstype = fstype.lower()
    return fstype in NETWORK_FS_TYPES or fstype.startswith(("nfs", "smb", "cifs"))


def check_local_filesystem(path: str | os.PathLike, mounts_text: str | None = None) -> None:
    """Raise `NetworkFilesystemError` when `path` lies on a network filesystem.

    Setting the environment variable GFATTN_STORE_ALLOW_NETWORK_FS=1 skips the check (for a filesystem
    that only one host ever touches; still at your own risk).
    """
    from store.errors import NetworkFilesystemError

    if os.environ.get(ALLOW_NETWORK_FS_ENV, "") not in ("", "0"):
        return
    fstype = filesystem_type(path, mounts_text)
    if is_network_filesystem(fstype):
        raise NetworkFilesystemError(
            f"store {os.fspath(path)} is on a network filesystem ({fstype}); SQLite WAL mode needs a local "
            f"disk (shared-memory index and file locks), so put the store on a local path "
            f"(--store PATH or GFATTN_STORE)"
        )


def write_blocker(path: str | os.PathLike) -> str | None:
    """Why the SQLite file `path` (existing or not) cannot be written here, or None when it can.

    Writing a WAL store needs the file and its folder (for the `-wal` and `-shm` files) to be writable.
    The answer is one clause for an error message: a read-only filesystem, a read-only file, or a
    folder that is not writable. Checked with `os.access`, so root passes permission bits (as SQLite
    does) but not a read-only mount.
    """
    p = Path(os.path.abspath(os.fspath(path)))
    folder = p.parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"it is on a read-only filesystem ({folder})"
    except OSError:
        pass
    if p.exists() and not os.access(p, os.W_OK):
        return "the file is read-only"
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        return f"its folder {folder} is not writable"
    return None


def hostname() -> str:
    return socket.gethostname()


def process_start_ticks(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux), used to tell a reused pid apart."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = data[data.rfind(")") + 2 :].split()
    try:
        return int(rest[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """Whether process `pid` on this host is alive (a zombie, or a reused pid, counts as gone)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        data = stat.read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    state = data[data.rfind(")") + 2 :].split()[:1]
    if state and state[0] in ("Z", "X"):
        return False
    if start_ticks is not None:
        now_ticks = process_start_ticks(pid)
        if now_ticks is not None and now_ticks != start_ticks:
            return False
    return True


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape a run's numbers (read from metadata, not imported)."""
    import platform
    import sqlite3

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    out["sqlite"] = sqlite3.sqlite_version
    return out


def git_commit(start: str | os.PathLike | None = None) -> str | None:
    """The commit checked out in the git work tree holding gfattn's source, read from .git without git."""
    here = Path(start) if start is not None else Path(__file__).resolve().parent
    for d in (here, *here.parents):
        git = d / ".git"
        if git.is_file():  # a worktree: "gitdir: PATH"
            try:
                text = git.read_text().strip()
            except OSError:
                return None
            if not text.startswith("gitdir:"):
                return None
            git = (d / text.split(":", 1)[1].strip()).resolve()
        if git.is_dir():
            return _read_head(git)
    return None


def _read_head(git: Path) -> str | None:
    try:
        head = (git / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return head or None
    ref = head.split(":", 1)[1].strip()
    common = git
    commondir = git / "commondir"
    if commondir.is_file():
        try:
            common = (git / commondir.read_text().strip()).resolve()
        except OSError:
            pass
    for base in (git, common):
        f = base / ref
        if f.is_file():
            try:
                return f.read_text().strip() or None
            except OSError:
                return None
    for base in (git, common):
        packed = base / "packed-refs"
        if packed.is_file():
            try:
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
            except OSError:
                return None
    return None  # a branch with no commits yet
