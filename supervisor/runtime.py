"""The supervisor's private runtime directory.

It holds the ZeroMQ ``ipc://`` sockets (``workers.sock``, ``control.sock``),
the lock that keeps two supervisors out of one directory, and the log of a
``--detach``-ed supervisor. Anyone who can connect to those sockets can steer
the supervisor, so the directory must be the user's own and mode 0700: an
existing directory that is not is refused, never "fixed" behind the user's back.

Default: ``$TUNNEL_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/tunnelctl``, else
``/tmp/tunnelctl-UID``.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from supervisor.errors import RuntimeDirError

WORKERS_SOCKET = "workers.sock"
CONTROL_SOCKET = "control.sock"
LOCK_FILE = "supervisor.lock"
LOG_FILE = "supervisor.log"


def default_runtime_dir(env: Mapping[str, str]) -> Path:
    if env.get("TUNNEL_RUNTIME_DIR"):
        return Path(env["TUNNEL_RUNTIME_DIR"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "tunnelctl"
    return Path(f"/tmp/tunnelctl-{os.getuid()}")


def ipc_endpoint(runtime_dir: Path, name: str) -> str:
    return f"ipc://{runtime_dir / name}"


def check_private(path: Path) -> None:
    """Raise :class:`RuntimeDirError` unless ``path`` is our own 0700 directory."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise RuntimeDirError(f"runtime directory {path} does not exist") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"runtime directory {path} is not a directory")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(f"runtime directory {path} belongs to uid {info.st_uid}, not to you")
    if info.st_mode & 0o077:
        raise RuntimeDirError(
            f"runtime directory {path} is accessible to others (mode {info.st_mode & 0o777:o}); "
            f"make it private: chmod 700 {path}"
        )


def prepare_runtime_dir(path: Path) -> Path:
    """Create ``path`` (0700) if needed and check that it is private."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeDirError(f"cannot create runtime directory {path}: {exc.strerror}") from None
    check_private(path)
    # ipc:// paths are limited by sun_path (108 bytes on Linux).
    if len(str(path / CONTROL_SOCKET)) > 100:
        raise RuntimeDirError(f"runtime directory path {path} is too long for a unix socket")
    return path


class RuntimeLock:
    """An exclusive lock on the runtime directory, held for the supervisor's life."""

    def __init__(self, runtime_dir: Path) -> None:
        self.path = runtime_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RuntimeDirError(
                f"a supervisor (pid {other}) already runs in {self.path.parent}; "
                "stop it or use another --runtime-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
