"""Run untrusted, model-generated Python programs in a child process with limits.

    from caft.sandbox import run_code
    result = run_code("def f():\\n    return 1\\nassert f() == 1\\n", timeout_s=5)
    result.passed, result.status  # True, "passed"

What the sandbox does, per program:

- runs it in a fresh `python -I` interpreter (isolated mode: no user site-packages, PYTHON*
  variables ignored, the working directory not on sys.path) in a new session, so it has its own
  process group;
- gives it a new temporary working directory that is deleted afterwards;
- builds the environment from scratch with only PATH and LANG, so no token, key or secret of
  the caller is inherited;
- connects stdin to /dev/null, so `input()` raises EOFError;
- reads stdout and stderr through pipes and keeps only the last OUTPUT_TAIL_BYTES of each.
  More than `max_output_bytes` of output in total kills the program;
- sets kernel limits in the child before the program starts: RLIMIT_AS (address space,
  `memory_mb`), RLIMIT_CPU, RLIMIT_FSIZE (size of written files), RLIMIT_NOFILE, RLIMIT_CORE=0
  and, when not running as root, RLIMIT_NPROC (the kernel ignores it for root);
- moves the program into a new network namespace, which has only a loopback device that is
  switched off, so no connection leaves it (root creates one directly; other users together
  with a new user namespace, where the kernel allows unprivileged user namespaces). It also
  makes `socket.socket()` and name lookups raise PermissionError. Where the kernel refuses the
  namespace, only that Python-level guard remains; `ExecResult.network` says which, and a
  warning is logged once;
- replaces the process-creation functions of `os`, `posix` and `_posixsubprocess` (fork,
  exec*, system, posix_spawn, subprocess) with functions that raise PermissionError, because
  under root RLIMIT_NPROC cannot stop a fork bomb;
- kills the whole process group with SIGKILL when the wall-clock timeout passes, and once
  more after the program ends, so stray children do not outlive it;
- counts a program as passed only if it ran to its end and exited with status 0: an
  assertion error, any other exception, `sys.exit()` (even with 0) or `os._exit()` before the
  end, a crash by a signal, a timeout or the output limit all count as failures. Nothing the
  program does raises in the caller.

What it does NOT protect against: it is process isolation with limits, not a security
boundary like a container or a VM. The program runs as the same user as the caller (root, if
the caller is root), so it can read and write every file that user can, outside its working
directory too. Native code (ctypes, C extensions) can bypass the Python-level process guard
and call fork directly; under root nothing then bounds the number of processes except the
wall-clock timeout, and a process that calls setsid() leaves the process group and survives
the kill. A program running as root can also raise its own resource limits again. RLIMIT_AS
bounds the virtual memory of each process, not of the machine.

The network namespace does not cover Unix sockets that are files (such as a Docker socket the
user can open), and without the namespace, native code or the C-level `_socket.socket` can
bypass the Python-level guard.
"""

from __future__ import annotations

import logging
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

# Bytes of stdout and of stderr that an ExecResult keeps (the end of each stream).
OUTPUT_TAIL_BYTES = 4096
# Output (stdout and stderr together) after which the program is killed and fails.
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
# Largest file the program may write (RLIMIT_FSIZE). Python ignores SIGXFSZ, so a larger write
# raises OSError (EFBIG) in the program.
MAX_FILE_BYTES = 16 << 20
# Maximum number of open file descriptors (RLIMIT_NOFILE).
MAX_OPEN_FILES = 64
# Processes and threads the program may add to its user's current count (RLIMIT_NPROC, non-root only).
NPROC_MARGIN = 32
# Seconds to wait for the pipes to close after the process group has been killed.
DRAIN_TIMEOUT_S = 1.0

logger = logging.getLogger(__name__)

_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_PROGRAM_NAME = "program.py"

# Code that the child interpreter runs before the program. It sets the limits, disables
# process creation, runs the program in a fresh namespace and writes one status line
# ("passed", "failed ...", "memory ...", "exit ..." or "error ...") to the status pipe.
_CHILD_BOOTSTRAP = r"""
import os, resource, sys

def _set_limit(kind, soft, hard=None):
    resource.setrlimit(kind, (soft, soft if hard is None else hard))

def _count_user_tasks(uid):
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat("/proc/" + entry).st_uid == uid:
                count += len(os.listdir("/proc/" + entry + "/task"))
        except OSError:
            pass
    return count

def _block_process_creation():
    import posix, _posixsubprocess
    def blocked(*args, **kwargs):
        raise PermissionError("process creation is disabled in the caft sandbox")
    names = ("fork", "forkpty", "vfork", "system", "posix_spawn", "posix_spawnp",
             "execv", "execve", "fexecve")
    for module in (os, posix):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, blocked)
    _posixsubprocess.fork_exec = blocked

def _isolate_network():
    # A new network namespace has only a loopback device, switched off, so every connection fails.
    # Root may create one directly; other users need a new user namespace with it.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    for flags in (clone_newnet, clone_newuser | clone_newnet):
        if libc.unshare(flags) == 0:
            return "namespace"
    return "guard"

def _block_sockets():
    import socket, _socket
    def blocked(*args, **kwargs):
        raise PermissionError("network access is disabled in the caft sandbox")
    socket.socket.__init__ = blocked  # the class stays, so modules that subclass it still import
    for module in (socket, _socket):
        for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, blocked)

def _print_traceback(error):
    import traceback
    # Skip the frame of _main so the traceback starts in the program.
    traceback.print_exception(type(error), error, error.__traceback__.tb_next)

def _report(fd, line):
    try:
        os.write(fd, line.encode("utf-8", "replace")[:1000])
    except OSError:
        pass

def _main():
    path, status_fd = sys.argv[1], int(sys.argv[2])
    memory_bytes, cpu_s, file_bytes, open_files, nproc_margin = map(int, sys.argv[3:8])

    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)
    _set_limit(resource.RLIMIT_FSIZE, file_bytes)
    _set_limit(resource.RLIMIT_NOFILE, open_files)
    # NOTE: the tests run as root, so this branch has not been run by them.
    if os.getuid() != 0:
        _set_limit(resource.RLIMIT_NPROC, _count_user_tasks(os.getuid()) + nproc_margin)
    # After the limits: a new user namespace changes what os.getuid() returns.
    _report(status_fd, "network " + _isolate_network() + "\n")
    with open(path, encoding="utf-8") as file:
        source = file.read()
    _block_process_creation()
    _block_sockets()
    sys.argv = [path]
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    _set_limit(resource.RLIMIT_AS, memory_bytes)

    try:
        exec(compile(source, path, "exec"), namespace)
    except SystemExit as error:
        line = "exit " + repr(error.code)
    except AssertionError as error:
        _print_traceback(error)
        line = "failed AssertionError"
    except MemoryError as error:
        line = "memory MemoryError"
        _print_traceback(error)
    except BaseException as error:
        _print_traceback(error)
        line = "error " + type(error).__name__
    else:
        line = "passed"

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    _report(status_fd, line)
    # Skip the program's atexit handlers and non-daemon threads.
    os._exit(0 if line == "passed" else 1)

_main()
"""


@dataclass
class ExecResult:
    """Outcome of one sandboxed program."""

    passed: bool
    status: str
    """One of "passed", "failed" (an assertion failed), "timeout" (wall clock or CPU time),
    "error" (another exception, an early exit, a crash, the output limit) or "memory"."""
    stdout: str
    """The last OUTPUT_TAIL_BYTES of standard output, decoded as UTF-8 with replacement."""
    stderr: str
    """The last OUTPUT_TAIL_BYTES of standard error, decoded the same way."""
    duration_s: float
    """Wall-clock seconds from start to the end of cleanup, excluding temp-dir creation."""
    returncode: int | None = None
    """Exit status of the interpreter; negative for a signal, None if it never started."""
    detail: str = ""
    """A short explanation of the status, for logs."""
    network: str = ""
    """The network isolation the program ran with: "namespace" (a new network namespace, plus the
    Python-level guard), "guard" (the Python-level guard only) or "" (it did not get that far)."""


class _Tail:
    """The last `limit` bytes written to a stream, plus the total byte count."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def append(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _minimal_env() -> dict[str, str]:
    return {"PATH": _SANDBOX_PATH, "LANG": "C.UTF-8"}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _has_exited(pid: int) -> bool:
    """Check for exit without reaping, so the pid (and the group id) stays reserved for killpg."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _remove_tree(path: str) -> None:
    """Delete the working directory, restoring permissions the program may have removed."""

    def make_writable_and_retry(function, failed_path, _error):
        try:
            parent = os.path.dirname(failed_path)
            os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
            os.chmod(failed_path, os.stat(failed_path).st_mode | stat.S_IRWXU)
            function(failed_path)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _read_status(fd: int) -> str:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096).decode("utf-8", errors="replace").strip()
    except BlockingIOError:
        return ""


def _split_status(text: str) -> tuple[str, str]:
    """Split what the child wrote to the status pipe into its network mode and its final status line."""
    network, status_line = "", ""
    for line in text.splitlines():
        if line.startswith("network "):
            network = line[len("network "):]
        elif line:
            status_line = line
    return network, status_line


_warned_network_guard = False


def _warn_network_guard_only() -> None:
    """Log once per process that the kernel refused the sandbox a network namespace."""
    global _warned_network_guard
    if _warned_network_guard:
        return
    _warned_network_guard = True
    logger.warning(
        "Failed to create a network namespace for the sandbox (not root, and unprivileged user namespaces are "
        "off), so only a Python-level guard keeps generated programs off the network, and native code can "
        "bypass it. Run evaluations of untrusted code in a container without network access."
    )


def _read_available(selector: selectors.BaseSelector, tails: dict[str, _Tail], timeout: float, max_bytes: int) -> bool:
    """Read what the pipes have within `timeout` seconds; return True once the output exceeds `max_bytes`."""
    for key, _ in selector.select(timeout=timeout):
        chunk = os.read(key.fd, 65536)
        if not chunk:
            selector.unregister(key.fileobj)
            continue
        tails[key.data].append(chunk)
        if tails["stdout"].total + tails["stderr"].total > max_bytes:
            return True
    return False


def _classify(status_line: str, returncode: int) -> tuple[str, str]:
    """Map the child's status line and exit status to (status, detail) when no limit of the parent fired."""
    if returncode == -signal.SIGXCPU:
        return "timeout", "killed: CPU time limit (SIGXCPU)"
    if returncode == -signal.SIGXFSZ:
        return "error", f"killed: a written file exceeded {MAX_FILE_BYTES} bytes (SIGXFSZ)"
    if status_line == "passed" and returncode == 0:
        return "passed", ""
    if status_line.startswith("failed"):
        return "failed", "assertion failed"
    if status_line.startswith("memory"):
        return "memory", "MemoryError: the address-space limit was reached"
    if status_line.startswith("exit"):
        return "error", f"the program called sys.exit({status_line[5:]}) before its end"
    if status_line.startswith("error"):
        return "error", f"uncaught {status_line[6:]}"
    if returncode < 0:
        return "error", f"killed by signal {signal.Signals(-returncode).name}"
    return "error", f"exited with status {returncode} before its end (os._exit or a crash)"


def run_code(
    program: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cpu_s: int | None = None,
    *,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> ExecResult:
    """Run `program` in a sandboxed `python -I` child and return how it ended.

    Exceptions, crashes and hangs of the program come back as a failed ExecResult; only invalid
    arguments (ValueError) or a failure to create the temporary directory (OSError) raise here.

    `timeout_s` bounds wall-clock time, `memory_mb` the child's address space, and `cpu_s` its
    CPU seconds (default: the timeout rounded up, plus one). See the module docstring for what
    is and is not contained.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be positive, got {memory_mb}")
    cpu_limit = cpu_s if cpu_s is not None else math.ceil(timeout_s) + 1
    workdir = tempfile.mkdtemp(prefix="caft-sandbox-")
    try:
        path = os.path.join(workdir, _PROGRAM_NAME)
        with open(path, "w", encoding="utf-8") as file:
            file.write(program)
        return _run_in(workdir, path, timeout_s, memory_mb, cpu_limit, max_output_bytes)
    finally:
        _remove_tree(workdir)


def _run_in(workdir: str, path: str, timeout_s: float, memory_mb: int, cpu_s: int, max_output_bytes: int) -> ExecResult:
    status_read, status_write = os.pipe()
    command = [
        sys.executable, "-I", "-c", _CHILD_BOOTSTRAP, path, str(status_write),
        str(memory_mb << 20), str(cpu_s), str(MAX_FILE_BYTES), str(MAX_OPEN_FILES), str(NPROC_MARGIN),
    ]
    start = time.monotonic()
    try:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=_minimal_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_write,),
            start_new_session=True,
        )
    except OSError as error:
        os.close(status_read)
        return ExecResult(False, "error", "", "", time.monotonic() - start, None, f"failed to start python: {error}")
    finally:
        os.close(status_write)

    tails = {"stdout": _Tail(OUTPUT_TAIL_BYTES), "stderr": _Tail(OUTPUT_TAIL_BYTES)}
    timed_out = output_exceeded = False
    deadline = start + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, "stdout")
        selector.register(process.stderr, selectors.EVENT_READ, "stderr")

        # Read both pipes until the program exits or a limit is hit. A program may close its
        # pipes and keep running, and a child of it may hold them open after it exits, so the
        # loop ends on the program's exit, not on end-of-file.
        while not output_exceeded:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if selector.get_map():
                output_exceeded = _read_available(selector, tails, min(remaining, 0.1), max_output_bytes)
            else:
                time.sleep(min(remaining, 0.02))
            if _has_exited(process.pid):
                break

        # Kill the group (the program, if still running, and anything it started), then drain.
        _kill_group(process.pid)
        drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while selector.get_map() and not output_exceeded and time.monotonic() < drain_deadline:
            output_exceeded = _read_available(selector, tails, 0.05, max_output_bytes)

    returncode = process.wait()
    process.stdout.close()
    process.stderr.close()
    network, status_line = _split_status(_read_status(status_read))
    os.close(status_read)
    if network == "guard":
        _warn_network_guard_only()
    duration = time.monotonic() - start

    if output_exceeded:
        status, detail = "error", f"killed: output exceeded {max_output_bytes} bytes"
    elif timed_out:
        status, detail = "timeout", f"killed: wall-clock timeout of {timeout_s:g} s"
    else:
        status, detail = _classify(status_line, returncode)
    return ExecResult(
        passed=status == "passed",
        status=status,
        stdout=tails["stdout"].text(),
        stderr=tails["stderr"].text(),
        duration_s=duration,
        returncode=returncode,
        detail=detail,
        network=network,
    )


def run_many(
    programs: Iterable[str],
    workers: int = 2,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cpu_s: int | None = None,
    *,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> list[ExecResult]:
    """Run several programs with `run_code`, `workers` at a time, and return the results in input order.

    Threads only wait on the child processes, so `workers` is the number of programs running at once.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    programs = list(programs)
    if not programs:
        return []

    def run_one(program: str) -> ExecResult:
        return run_code(program, timeout_s, memory_mb, cpu_s, max_output_bytes=max_output_bytes)

    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(run_one, programs))
