"""Clear errors for what a sandbox cannot do: open sockets, start threads, create links.

`socket` and `threading` still import, since much code imports them without using them; only
using them fails, with an error that says what to do instead. Installed when the module is
first imported (see `_capsule_dispatch.initialize`).
"""

import errno

SOCKETS = (
    "sockets are not available in a Capsule sandbox: make HTTP(S) requests with `capsule.http` "
    "(urllib.request goes through it), to the hosts the task's `allowed_hosts` permits"
)
LINKS = (
    "symbolic links cannot be created in a Capsule sandbox: one in a granted folder could lead "
    "out of it; write a copy of the file instead"
)
THREADS = (
    "threads cannot be started in a Capsule sandbox: run work in parallel as sub-tasks "
    "(`other_task.spawn(...)` or `other_task.map(...)`, each in its own sandbox)"
)


def _no_sockets(*args, **kwargs):
    raise OSError(errno.ENOTSUP, SOCKETS)


def _no_threads(*args, **kwargs):
    raise RuntimeError(THREADS)


def guard_sockets(socket_module):
    """Make `socket.socket(...)` and name lookups fail with `SOCKETS`."""
    socket_module.socket.__init__ = _no_sockets
    socket_module.getaddrinfo = _no_sockets
    socket_module.create_connection = _no_sockets


def guard_threads(threading_module):
    """Make `Thread.start()` (and `_thread`'s functions) fail with `THREADS`."""
    import _thread

    threading_module._start_joinable_thread = _no_threads
    _thread.start_new_thread = _no_threads
    _thread.start_joinable_thread = _no_threads


def guard_links(os_module):
    """Make `os.symlink` fail with `LINKS` (the host refuses the call in any case)."""

    def symlink(*args, **kwargs):
        raise PermissionError(errno.EPERM, LINKS)

    os_module.symlink = symlink
