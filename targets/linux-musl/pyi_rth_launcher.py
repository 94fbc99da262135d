"""PyInstaller runtime hook of dist/frys: the runtime dies with the process that was started.

dist/frys runs as three processes: staticx's loader (the pid a supervisor or `docker` sees),
PyInstaller's loader, then Python. A signal that can be caught (SIGTERM, SIGINT, SIGHUP) is
passed down the chain, but SIGKILL cannot be, and without this hook `kill -9 PID` would leave
the runtime running, holding the data-dir lock, with no parent. So a thread waits on a pidfd
of the first process and, when it is gone, cleans up after it and kills this one the same way.
"""

import os
import select
import shutil
import signal
import sys
import threading


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        return int(f.read().rpartition(")")[2].split()[1])


def _watch(pidfd: int) -> None:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.poll()  # readable once the process has exited
    # The dead loader cannot remove what it unpacked (23 MB); PyInstaller's loader removes
    # its own directory once this process is gone.
    bundle = os.environ.get("STATICX_BUNDLE_DIR")
    if bundle:
        shutil.rmtree(bundle, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _die_with_the_launcher() -> None:
    parent = os.getppid()  # PyInstaller's loader
    try:
        launcher = _parent_of(parent) if "STATICX_PROG_PATH" in os.environ else parent
        pidfd = os.pidfd_open(launcher)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)  # killed while this process was starting
        return
    except (OSError, AttributeError, ValueError, IndexError):
        return  # no pidfd (Linux < 5.3) or no /proc: run on, as any process would
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)  # the loader died before the pidfd was open
    threading.Thread(target=_watch, args=(pidfd,), name="frys-launcher-watch", daemon=True).start()


if sys.platform == "linux":
    _die_with_the_launcher()
