"""The job's hold on its processes and on its output_dir, and how a run stops on a signal.

Processes: a rank started by torchrun and every DataLoader worker die with their parent, so killing
the torchrun agent (even with SIGKILL) leaves nothing training and writing behind it. A rank ties
itself to the agent when train.main is imported, before the seconds of heavy imports.

Stopping: SIGTERM (a scheduler's preemption or cancel, torchrun passing on its own) and SIGINT (Ctrl-C)
ask the training loop to stop after the current step with a checkpoint (train/main.py decides it on
every rank at once); a second Ctrl-C exits at once. During setup there is nothing to save: a signal
ends the process at once, quietly.

output_dir: one job at a time. Rank 0 holds `output_dir/.lock` (JSON: host, pid, start time, command)
from before the first file is written until the run ends; a second job on the same folder is refused
at once, on every rank, naming the holder. A lock whose holder died on this host is taken over.
"""

import atexit
import ctypes
import datetime
import errno
import fcntl
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL = 1.0  # seconds between parent checks where prctl is unavailable
# The torchrun agent's pid, exported by launch/*.sh right before they exec torchrun (the pid stays): it
# tells a rank that started after its agent died (adopted by a subreaper, not by init) that it is alone.
AGENT_PID_ENV = "WAN_TRAIN_AGENT_PID"

# SIGKILL, not SIGTERM: a Python SIGTERM handler runs only when the main thread next executes
# bytecode, and a rank whose agent is gone is often blocked in C++ (a collective waiting for peers
# that died with the agent, for up to the 30-minute process-group timeout). SIGKILL cannot be delayed
# or caught. Nothing is lost by it: a rank killed mid-save leaves `checkpoint-N.tmp/` and the previous
# checkpoint stays the newest (the atomic rename), and the output_dir lock of a killed rank 0 loses its
# flock with the process and names a dead pid, so the next run takes it over.
PARENT_DEATH_SIGNAL = signal.SIGKILL


# --- dying with the parent ---------------------------------------------------------------------------


def _set_parent_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel signals this process when the thread that created it exits.
    False where unavailable (not Linux, or no libc to call)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    os.kill(os.getpid(), PARENT_DEATH_SIGNAL)


def _orphaned(parent: int | None) -> bool:
    """Whether the parent is gone already. Without its pid (a rank does not know the agent's), only an
    adoption by init tells, and init is also the parent when torchrun runs as a container's first
    process (then the container ends with it): that case is told apart by init's command line."""
    if parent is not None:
        return os.getppid() != parent
    if os.getppid() != 1:
        return False
    try:
        return b"torch" not in Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return False


def _say_and_die(message: str) -> None:
    try:
        os.write(2, (message + "\n").encode())
    except OSError:  # a pipe the dead parent read (torchrun --redirects / --tee): dying matters more
        pass
    os.kill(os.getpid(), PARENT_DEATH_SIGNAL)


def die_with_parent(parent: int | None = None) -> None:
    """Kill this process as soon as its parent is gone. `parent`: the pid it must have (None: whichever it
    has now). Call it as early as possible in the child."""
    if not _set_parent_death_signal():
        # A polling thread instead (macOS, no prctl): up to WATCH_INTERVAL late, and a daemon thread, so
        # it never keeps the process alive by itself.
        expected = os.getppid() if parent is None else parent
        threading.Thread(target=_watch_parent, args=(expected,), name="watch-parent", daemon=True).start()
    # The parent may have died before the death signal was set: nothing would fire then.
    if _orphaned(parent):
        _say_and_die(f"pid {os.getpid()}: the process that started this one is gone; exiting")


def under_torchrun() -> bool:
    """Whether torchrun's elastic agent started this process (it sets TORCHELASTIC_RUN_ID for its workers)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


_agent_pid: int | None = None  # the agent this rank is tied to (tie_rank_to_launcher)


def _named_agent() -> int | None:
    try:
        pid = int(os.environ.get(AGENT_PID_ENV, ""))
    except ValueError:
        return None
    return pid if pid > 1 else None


def tie_rank_to_launcher() -> bool:
    """Under torchrun, die with the agent (the rank's parent); a plain `python -m train.main` is left
    alone (its parent is a shell, which has no say over the run). Returns whether it tied. Called at
    train.main's import, before torch's: an agent killed while its ranks still import (seconds, more on
    a shared filesystem) must take them along."""
    global _agent_pid
    if not under_torchrun():
        return False
    if _agent_pid is not None:
        return True
    # The parent's pid first, before anything slow. A rank whose agent is gone already was adopted: by
    # init (pid 1), or by the nearest subreaper (systemd --user, `tini -s`, a container runtime), whose
    # pid tells nothing. The agent's own pid, from launch/*.sh, tells it; init's command line is the
    # fallback (torchrun may be a container's first process, and then the container ends with it).
    parent, named = os.getppid(), _named_agent()
    if named is not None and named != parent and not _pid_alive(named):
        _say_and_die(
            f"pid {os.getpid()}: the torchrun agent that started this rank ({AGENT_PID_ENV}={named}) is gone; exiting"
        )
    if _orphaned(None):
        _say_and_die(f"pid {os.getpid()}: the torchrun agent that started this rank is gone; exiting")
    # A named pid that is alive but not the parent is another run's (an exported variable inherited by
    # a torchrun started some other way): the parent is the agent then.
    _agent_pid = parent
    die_with_parent(parent)
    return True


def tie_worker_to_parent(parent: int, worker_id: int) -> None:
    """A DataLoader worker_init_fn (bind `parent`, the training process's pid, with functools.partial):
    the worker dies with the process that started it, torchrun or not."""
    if os.getppid() != parent and _pid_alive(parent):
        # Started by a forkserver (the default from Python 3.14), not by the training process: the server
        # exits when the training process does, so the worker follows it.
        parent = os.getppid()
    die_with_parent(parent)
    # A Ctrl-C reaches the terminal's whole process group, and torchrun passes its signals on to each
    # rank's process group (killpg): workers included. A worker that died of it would make its rank's
    # next batch fail in the middle of the step the rank is finishing to stop with a checkpoint. The
    # worker still ends with its rank (the death signal above), or when its loader shuts it down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# --- one job per output_dir ---------------------------------------------------------------------------


def _try_flock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True, False (someone holds it), None (unsupported here)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return False
        return None  # ENOLCK, EINVAL, EOPNOTSUPP: a filesystem without flock; the pid check remains


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:  # a zombie is dead (killed, not yet reaped: a container whose init does not reap keeps it)
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError):  # no /proc (not Linux)
        return True


def _read_holder(fd: int) -> dict | None:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or not isinstance(info.get("host"), str):
        return None
    return info


def _launcher_command() -> str:
    """The torchrun command line (the agent's, from /proc), else this process's: what the user typed."""
    if under_torchrun():
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            return shlex.join(a.decode(errors="replace") for a in raw.split(b"\0") if a)
        except OSError:
            pass
    return shlex.join([sys.executable, *sys.argv])


def _describe(info: dict) -> str:
    agent = f" (torchrun agent pid {info['agent_pid']})" if info.get("agent_pid") else ""
    return (
        f"pid {info['pid']}{agent} on host {info['host']}, started {info.get('start_time', '?')}, "
        f"command: {info.get('command', '?')}"
    )


class OutputDirLock:
    """The lock file this process holds: created with O_EXCL, flocked while held (the kernel drops the
    flock when the process dies, however it dies), removed on release."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd, self.owner = path, fd, os.getpid()

    def release(self) -> None:
        # Only the process that took it: a forked DataLoader worker inherits the object (and a SIGTERM
        # handler) but must never remove its training process's lock.
        if self.fd is None or os.getpid() != self.owner:
            return
        try:  # still ours? A user may have deleted it and another run taken the name
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _check_holder(path: Path) -> bool:
    """Look at an existing lock: raise ValueError when its holder may be alive; remove it when the holder
    is dead (True: try again); False when it is being written or just went away (try again shortly)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # its holder just released it
    try:
        free = _try_flock(fd)
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return True  # replaced while we opened it: look at the new one
        except FileNotFoundError:
            return True
        info = _read_holder(fd)
        if info is None:
            # A holder between O_EXCL and writing (milliseconds), or one that died right there.
            if free is False or time.time() - os.fstat(fd).st_mtime < 5:
                return False
            print(f"taking over the lock {path}: unreadable and not held by any process", flush=True)
            os.unlink(path)
            return True
        host = socket.gethostname()
        if info["host"] != host:
            raise ValueError(
                f"{path.parent} is in use by another run: {_describe(info)}. Its liveness cannot be checked "
                f"from this host ({host}); if you know that run is gone, delete {path} and start again"
            )
        if free is False or _pid_alive(info["pid"]):
            raise ValueError(
                f"{path.parent} is in use by another run: {_describe(info)}. Wait for it to end, stop it, or "
                f"give this run another output_dir (lock file: {path})"
            )
        print(f"taking over the stale lock {path}: {_describe(info)} is gone", flush=True)
        os.unlink(path)  # while holding its flock, so a contender cannot judge it meanwhile
        return True
    finally:
        os.close(fd)  # drops the flock we may have taken


def take_output_dir_lock(output_dir: str | Path) -> OutputDirLock:
    """Create output_dir (if needed) and its lock file, or raise ValueError naming the run that holds it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    for _ in range(100):  # a contender racing for the same lock, or a holder still writing it (< 5 s)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _check_holder(path):
                time.sleep(0.05)
            continue
        if _try_flock(fd) is False:  # a contender examining it: wait for it to let go
            fcntl.flock(fd, fcntl.LOCK_EX)
        info = {
            "host": socket.gethostname(), "pid": os.getpid(),
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": _launcher_command(),
        }  # fmt: skip
        if under_torchrun():
            info["agent_pid"] = _agent_pid or os.getppid()
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        return OutputDirLock(path, fd)
    raise ValueError(f"could not take the lock {path}: it kept changing; is another run starting there?")


_held: dict[Path, OutputDirLock] = {}
_exit_hooks = False


def release_output_dir() -> None:
    """Give back every output_dir lock this process holds (at the end of a run; also at exit and on SIGTERM)."""
    while _held:
        _held.popitem()[1].release()


def _on_sigterm(signum: int, frame) -> None:
    """SIGTERM where install_stop_handlers did not take it over (a process other than train.main)."""
    release_output_dir()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of SIGTERM as before, for torchrun's report


def _release_on_exit() -> None:
    global _exit_hooks
    if _exit_hooks:
        return
    _exit_hooks = True
    atexit.register(release_output_dir)  # a normal exit or an exception (os._exit skips it: see main())
    # SIGTERM (torchrun stopping its workers, a scheduler's cancel) kills without atexit. Only when nobody
    # else handles it, and only from the main thread (where Python allows handlers). The handler runs when
    # the main thread next executes bytecode; one stuck in C++ for longer is SIGKILLed by torchrun after
    # its grace period, and its lock is then taken over as stale.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def hold_output_dir(output_dir: str | Path, rank: int) -> None:
    """Rank 0 takes output_dir's lock before anything is written there; every rank learns the outcome
    (a broadcast), so a refused job ends on every rank with the same ValueError, naming the holder,
    instead of hanging. Call it on every rank. A process that holds the lock already keeps it."""
    path = Path(output_dir).absolute() / LOCK_NAME
    refusal = None
    if rank == 0 and path not in _held:
        try:
            lock = take_output_dir_lock(path.parent)
        except ValueError as err:
            refusal = str(err)
        except OSError as err:  # an unwritable output_dir: the other ranks must hear of it too
            refusal = f"cannot create the lock file {path}: {err}"
        else:
            _release_on_exit()
            _held[path] = lock
    # Not imported at the top: guard must stay light (tie_rank_to_launcher runs before torch's import).
    # A process that has not imported torch.distributed has no process group to tell.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise ValueError(refusal)


# --- stopping on a signal -------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# One request may arrive twice within this many seconds: a Ctrl-C that reaches the rank both from the
# terminal and through a launcher, a scheduler signalling every process of the job while the torchrun
# agent passes on its own copy. A person's second Ctrl-C comes later.
REPEAT_WINDOW_S = 1.0

_graceful = False  # whether the training loop watches for a stop request (stop_gracefully)
_requested: tuple[int, float] | None = None  # the first signal in graceful mode, and when it came


def install_stop_handlers() -> None:
    """Take SIGINT and SIGTERM in the main thread (call it first thing in main()). Until
    stop_gracefully(), a signal ends the process at once and quietly: nothing is trained yet, so nothing
    is lost. After it, the first asks for a stop (stop_requested()) and a later SIGINT, or any signal
    after a SIGINT, ends the process at once. A repeated SIGTERM is only the same request again."""
    global _graceful, _requested
    _graceful, _requested = False, None
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)


def stop_gracefully() -> None:
    """From now on a signal asks the loop to stop with a checkpoint instead of ending the process."""
    global _graceful
    _graceful = True


def stop_requested() -> signal.Signals | None:
    """The signal that asked this process to stop, if one did (this process only: the loop agrees with
    the other ranks through a collective)."""
    return None if _requested is None else signal.Signals(_requested[0])


def _on_stop_signal(signum: int, frame) -> None:
    global _requested
    now = time.monotonic()
    if not _graceful:
        _exit_now(signum, None)
    if _requested is None:
        _requested = (signum, now)
        return
    first, at = _requested
    if now - at < REPEAT_WINDOW_S:
        return
    if signum == signal.SIGINT or first == signal.SIGINT:
        _exit_now(signum, f"a second stop signal ({signal.Signals(signum).name}): exiting now, without a checkpoint")


def _exit_now(signum: int, message: str | None) -> None:
    """End this process by `signum` (its default action: the exit status says which signal), with no
    traceback, after giving back the output_dir lock (the kernel's default action skips atexit)."""
    if message is not None and os.environ.get("RANK", "0") == "0":
        try:
            os.write(2, (message + "\n").encode())  # not print(): a handler may interrupt a print
        except OSError:
            pass
    release_output_dir()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
