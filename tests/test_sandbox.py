"""Tests of caft.sandbox: each runs real `python -I` child processes."""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

import pytest

from caft.sandbox import OUTPUT_TAIL_BYTES, ExecResult, run_code, run_many

PASSING = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n"


def _process_state(pid: int) -> str | None:
    """Return the state letter of a process (R, S, Z, ...), or None when it no longer exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def test_passing_program_passes():
    result = run_code(PASSING, timeout_s=5)

    assert isinstance(result, ExecResult)
    assert result.passed
    assert result.status == "passed"
    assert result.returncode == 0
    assert result.duration_s < 5


def test_failing_assert_fails():
    result = run_code("assert 1 + 1 == 3\n", timeout_s=5)

    assert not result.passed
    assert result.status == "failed"
    assert "AssertionError" in result.stderr
    assert "program.py" in result.stderr


def test_other_exception_is_error():
    result = run_code("raise KeyError('missing')\n", timeout_s=5)

    assert not result.passed
    assert result.status == "error"
    assert "KeyError" in result.detail


def test_syntax_error_is_error():
    result = run_code("def broken(:\n", timeout_s=5)

    assert result.status == "error"
    assert "SyntaxError" in result.stderr


def test_infinite_loop_times_out_and_caller_continues():
    start = time.monotonic()
    result = run_code("while True:\n    pass\n", timeout_s=2)
    elapsed = time.monotonic() - start

    assert not result.passed
    assert result.status == "timeout"
    assert 2 <= elapsed < 3.5
    assert run_code(PASSING, timeout_s=5).passed


def test_sleep_times_out():
    result = run_code("import time\ntime.sleep(60)\n", timeout_s=1)

    assert result.status == "timeout"
    assert result.duration_s < 2.5


def test_cpu_limit_stops_busy_loop():
    result = run_code("while True:\n    pass\n", timeout_s=20, cpu_s=1)

    assert result.status == "timeout"
    assert "CPU" in result.detail
    assert result.duration_s < 5


def test_huge_allocation_fails_without_crashing_caller():
    result = run_code("data = bytearray(4 * 1024 ** 3)\nassert len(data) > 0\n", timeout_s=10, memory_mb=1024)

    assert not result.passed
    assert result.status == "memory"
    assert "MemoryError" in result.stderr


def test_fork_bomb_contained():
    program = "import os\nwhile True:\n    os.fork()\n"
    result = run_code(program, timeout_s=5)

    assert not result.passed
    assert result.status == "error"
    assert "PermissionError" in result.stderr
    assert result.duration_s < 5


def test_subprocess_and_multiprocessing_blocked():
    programs = [
        "import subprocess\nsubprocess.run(['true'])\n",
        "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()\n",
        "import os\nos.system('true')\n",
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'exit 0'])\n",
    ]
    for program, result in zip(programs, run_many(programs, workers=2, timeout_s=5)):
        assert result.status == "error", program
        assert "PermissionError" in result.stderr, program


def test_timeout_kills_child_processes():
    # ctypes calls fork() directly and so bypasses the Python-level guard; the group kill must still reach the child.
    program = (
        "import ctypes, os, time\n"
        "ctypes.CDLL(None).fork()\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(60)\n"
    )
    result = run_code(program, timeout_s=2)

    pids = [int(word) for word in result.stdout.split()]
    assert result.status == "timeout"
    assert len(pids) == 2
    time.sleep(0.3)
    for pid in pids:
        assert _process_state(pid) in (None, "Z"), f"process {pid} outlived the sandbox"


def test_child_holding_pipes_does_not_delay_result():
    program = (
        "import ctypes, time\n"
        "if ctypes.CDLL(None).fork() == 0:\n"
        "    time.sleep(60)\n"
        "print('parent done')\n"
    )
    result = run_code(program, timeout_s=10)

    assert result.duration_s < 3
    assert "parent done" in result.stdout


# Connects with libc's socket() and connect(), below Python's socket module and its guard; prints errno (0 = connected).
RAW_CONNECT = """
import ctypes, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
address = struct.pack("=HH4s8x", socket.AF_INET, socket.htons(PORT), socket.inet_aton("127.0.0.1"))
result = libc.connect(fd, ctypes.c_char_p(address), len(address))
print("errno", 0 if result == 0 else ctypes.get_errno())
libc.close(fd)
"""


@pytest.fixture
def loopback_server():
    """A TCP server on 127.0.0.1 that accepts connections; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def test_network_namespace_blocks_raw_connect(loopback_server):
    """Even native code cannot reach a server that the caller reaches (the kernel refuses: no network)."""
    program = RAW_CONNECT.replace("PORT", str(loopback_server))
    namespace = {}
    exec(program.replace("print(", "namespace['line'] = ("), {"namespace": namespace})
    assert namespace["line"] == ("errno", 0)  # the same code connects from the caller

    result = run_code(program, timeout_s=10)

    assert result.network == "namespace"
    assert result.passed, result.stderr
    assert result.stdout.split() != ["errno", "0"]
    assert int(result.stdout.split()[1]) == errno.ENETUNREACH


def test_socket_module_blocked(loopback_server):
    programs = [
        f"import socket\nsocket.create_connection(('127.0.0.1', {loopback_server}), timeout=2)\n",
        "import socket\nsocket.getaddrinfo('localhost', 80)\n",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:%d/', timeout=2)\n" % loopback_server,
    ]
    for program, result in zip(programs, run_many(programs, workers=2, timeout_s=10)):
        assert result.status == "error", program
        assert "network access is disabled in the caft sandbox" in result.stderr, program


def test_modules_subclassing_socket_still_import():
    result = run_code("import ssl, asyncio, http.client\nassert issubclass(ssl.SSLSocket, __import__('socket').socket)\n", timeout_s=10)

    assert result.passed, result.stderr


def test_parent_secrets_not_visible(monkeypatch):
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "secret-value")
    monkeypatch.setenv("HF_TOKEN", "secret-value")
    monkeypatch.setenv("WANDB_TOKEN", "secret-value")
    monkeypatch.setenv("OPENAI_API_KEY", "secret-value")
    program = (
        "import os\n"
        "print(sorted(os.environ))\n"
        "assert 'HUGGINGFACE_TOKEN' not in os.environ\n"
        "assert 'secret-value' not in repr(dict(os.environ))\n"
    )
    result = run_code(program, timeout_s=5)

    assert result.passed, result.stderr
    assert "secret-value" not in result.stdout
    assert result.stdout.strip() == "['LANG', 'PATH']"


def test_temp_dir_removed():
    program = "import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('data')\nos.mkdir('sub')\nos.chmod('sub', 0)\n"
    result = run_code(program, timeout_s=5)

    workdir = Path(result.stdout.strip())
    assert result.passed, result.stderr
    assert workdir.name.startswith("caft-sandbox-")
    assert not workdir.exists()


def test_temp_dir_removed_after_timeout():
    result = run_code("import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(60)\n", timeout_s=1)

    assert result.status == "timeout"
    assert not Path(result.stdout.strip()).exists()


def test_huge_stdout_capped_and_fails():
    result = run_code("while True:\n    print('x' * 10000)\n", timeout_s=10)

    assert not result.passed
    assert result.status == "error"
    assert "output exceeded" in result.detail
    assert len(result.stdout) <= OUTPUT_TAIL_BYTES
    assert result.duration_s < 5


def test_moderate_output_kept_as_tail():
    program = "for i in range(20000):\n    print(i)\nassert True\n"
    result = run_code(program, timeout_s=10)

    assert result.passed
    assert len(result.stdout.encode()) == OUTPUT_TAIL_BYTES
    assert result.stdout.endswith("19999\n")


def test_early_exit_counts_as_failure():
    programs = {
        "sys.exit(0)": "import sys\nsys.exit(0)\nassert False\n",
        "os._exit(0)": "import os\nos._exit(0)\nassert False\n",
        "raise SystemExit": "raise SystemExit\n",
    }
    for name, program in programs.items():
        result = run_code(program, timeout_s=5)
        assert not result.passed, name
        assert result.status == "error", name


def test_crash_by_signal_is_error():
    result = run_code("import ctypes\nctypes.string_at(0)\n", timeout_s=5)

    assert result.status == "error"
    assert "SIGSEGV" in result.detail


def test_stdin_is_empty():
    result = run_code("input()\n", timeout_s=5)

    assert result.status == "error"
    assert "EOFError" in result.stderr


def test_large_file_write_fails():
    program = "with open('big.bin', 'wb') as file:\n    file.write(b'0' * (64 * 1024 * 1024))\n"
    result = run_code(program, timeout_s=10)

    assert not result.passed
    assert result.status == "error"
    assert "File too large" in result.stderr


def test_thread_bomb_contained():
    program = (
        "import threading, time\n"
        "while True:\n"
        "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
    )
    result = run_code(program, timeout_s=10, memory_mb=512)

    assert result.status == "error"
    assert "can't start new thread" in result.stderr
    assert result.duration_s < 5


def test_run_many_parallel_keeps_order():
    programs = [f"import time\ntime.sleep(0.5)\nprint({index})\nassert {index} % 3 != 0\n" for index in range(8)]
    start = time.monotonic()
    results = run_many(programs, workers=4, timeout_s=10)
    elapsed = time.monotonic() - start

    assert len(results) == 8
    assert [result.stdout.strip() for result in results] == [str(index) for index in range(8)]
    assert [result.passed for result in results] == [index % 3 != 0 for index in range(8)]
    assert elapsed < 8 * 0.5


def test_run_many_empty():
    assert run_many([], workers=2) == []
