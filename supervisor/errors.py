"""The exception tree of :mod:`supervisor`.

::

    SupervisorError           root: anything this package raises on purpose
    ├── ConfigError           the configuration (TOML file or command-line flags) is
    │                         invalid; ``path`` names the offending key
    ├── ControlError          the control endpoint (PROTOCOL.md §4) could not be
    │   │                     reached, or it answered with an error
    │   └── NotRunning        no supervisor answers in that runtime directory (the
    │                         CLI exits 3 for this one)
    └── RuntimeDirError       the runtime directory is unsafe (another owner, a mode
                              wider than 0700) or unusable (cannot be created)

Split by origin: :class:`ConfigError` is the operator's input, :class:`ControlError`
is the other end of the control socket, :class:`RuntimeDirError` is the host.
Each message is one line, fit for ``tunnelctl: error: ...``; none ever contains a
token or a TURN credential.
"""

from __future__ import annotations


class SupervisorError(Exception):
    """Root of every error raised on purpose by :mod:`supervisor`."""


class ConfigError(SupervisorError):
    """The configuration is invalid.

    ``path`` is the key path of the offending value, in TOML terms
    (``signal``, ``supervisor.pool_size``, ``devices[1].services.web``; array
    indexes count from 0), or the flag (``--expose``) when the configuration came
    from the command line, or ``None`` for a problem with the file as a whole
    (its message then names the file). ``message`` says what is wrong, and
    ``str(exc)`` is ``f"{path}: {message}"`` (just ``message`` without a path).
    """

    def __init__(self, path: str | None, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str | None, str]]:
        # The default would call ConfigError(str(self)) and lose the path.
        return type(self), (self.path, self.message)


class ControlError(SupervisorError):
    """The control endpoint could not be reached, or it answered with an error.

    Raised to ``tunnelctl status|sessions|stop|...``: no supervisor is running in
    the runtime directory, it did not answer in time, or it replied
    ``{"ok": false, "error": ...}``.
    """


class NotRunning(ControlError):
    """No supervisor answers in the runtime directory: no control socket there, or
    no reply in time. ``tunnelctl`` exits 3 (LSB's "program is not running")."""


class RuntimeDirError(SupervisorError):
    """The runtime directory is unsafe or unusable.

    The ZeroMQ ``ipc://`` endpoints live there (ARCHITECTURE.md), so anyone who
    can write to it could talk to the supervisor or impersonate a worker: e.g. it
    is not a directory, is owned by another user, or its mode is wider than 0700.
    """
