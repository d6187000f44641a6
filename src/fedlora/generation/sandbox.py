"""Running a candidate program against its tests: a subprocess with a time limit, no network, a private
temporary directory, and writes outside it refused.

What it guarantees (for model-generated code that is wrong by accident, not code written to escape):

- **Time.** The program runs in its own process group, killed (SIGKILL, the whole group) at ``timeout``
  seconds of wall time; a CPU-time rlimit backs that up. A killed program counts as failed.
- **Files.** The working directory is a fresh temporary directory, deleted afterwards (also HOME and TMPDIR).
  ``open``/``io.open``/``os.open`` for writing, and ``os``'s removing, renaming, linking, ``chmod`` and
  ``mkdir`` functions refuse any path that resolves outside it; a file-size rlimit caps what it can write.
- **Network.** ``socket.socket``, ``socketpair`` and name resolution raise; the environment carries no
  proxy settings (only PATH, HOME, TMPDIR and LANG).
- **Processes and memory.** ``os.system``, ``fork``, ``exec*``, ``spawn*``, ``kill`` and ``subprocess`` raise; an
  address-space rlimit (``memory_mb``) bounds memory.
- **Exit.** The program passes only if it exits with status 0 *after* running to its end (a sentinel printed
  after the last line): ``sys.exit(0)`` or ``os._exit(0)`` half-way does not pass.

Limits: these guards are Python-level patches and rlimits in an ordinary process (``python -I``), not an OS
sandbox; code set on escaping (ctypes, re-importing ``_io``/``posix``) can get past them. Run untrusted code
from the internet in a container or VM.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_PRELUDE = r'''
import builtins as _b, io as _io, os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
_TOKEN, _CANDIDATE = {token!r}, {candidate!r}
try:
    import resource as _r
    for _kind, _value in ((_r.RLIMIT_AS, {memory}), (_r.RLIMIT_FSIZE, {fsize}), (_r.RLIMIT_CORE, 0),
                          (_r.RLIMIT_CPU, {cpu})):
        try:
            _r.setrlimit(_kind, (_value, _value))
        except (ValueError, OSError):
            pass
except ImportError:
    pass

def _deny(what):
    def refuse(*args, **kwargs):
        raise PermissionError("sandbox: " + what + " is not allowed")
    return refuse

_realpath, _fsdecode, _fspath = _os.path.realpath, _os.fsdecode, _os.fspath
def _inside(path):
    if isinstance(path, int):
        return True
    p = _realpath(_fsdecode(_fspath(path)))
    return p == _ROOT or p.startswith(_ROOT + _os.sep)
def _check(path):
    if not _inside(path):
        raise PermissionError("sandbox: writing outside the working directory is not allowed: %r" % (path,))

_open = _b.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _check(file)
    return _open(file, mode, *args, **kwargs)
_b.open = _io.open = _guarded_open

_os_open = _os.open
_WRITE = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE:
        if kwargs.get("dir_fd") is not None:
            raise PermissionError("sandbox: dir_fd writes are not allowed")
        _check(path)
    return _os_open(path, flags, *args, **kwargs)
_os.open = _guarded_os_open

def _guard(name, n_paths):
    fn = getattr(_os, name, None)
    if fn is None:
        return
    def guarded(*args, **kwargs):
        if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None or kwargs.get("dst_dir_fd") is not None:
            raise PermissionError("sandbox: dir_fd file operations are not allowed")
        for p in args[:n_paths]:
            _check(p)
        return fn(*args, **kwargs)
    setattr(_os, name, guarded)
for _name in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "removedirs", "chmod", "chown", "lchown",
              "truncate", "mkfifo", "mknod", "utime", "chflags", "lchmod", "setxattr", "removexattr"):
    _guard(_name, 1)
for _name in ("rename", "replace", "link", "symlink", "renames"):
    _guard(_name, 2)

for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "posix_spawn", "posix_spawnp", "execv",
              "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
              "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "chroot", "setuid"):
    if hasattr(_os, _name):
        setattr(_os, _name, _deny("os." + _name))
import shutil as _shutil
_shutil._use_fd_functions = False  # rmtree by path, through the guarded os functions
import subprocess as _sp
_sp.Popen = _deny("starting a process")
for _name in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(_sp, _name, _deny("starting a process"))

import socket as _socket_mod, _socket
class _NoSocket(_socket_mod.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("sandbox: network access is disabled")
_socket_mod.socket = _socket.socket = _NoSocket
for _name in ("socketpair", "create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
              "gethostbyaddr", "fromfd"):
    setattr(_socket_mod, _name, _deny("network access"))
try:
    import resource as _r
    _r.setrlimit = _deny("changing resource limits")
except ImportError:
    pass

_source = _open(_CANDIDATE, encoding="utf-8").read()
_sys.argv = ["candidate.py"]
_globals = {{"__name__": "__main__", "__builtins__": _b}}
exec(compile(_source, "candidate.py", "exec"), _globals)
_sys.stdout.flush()
_sys.stdout.write("\n" + _TOKEN + "\n")
_sys.stdout.flush()
'''


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed", "failed" (non-zero exit or exited early), "timeout"
    output: str  # the tail of stdout+stderr (sentinel removed)
    seconds: float


def run_program(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16,
                max_output: int = 4000) -> RunResult:
    """Run ``program`` (candidate code followed by its tests) in the sandbox; passed = ran to its end, exit 0."""
    if not timeout > 0:
        raise ValueError(f"timeout={timeout} must be positive; pass the time limit in seconds, e.g. 10")
    root = Path(tempfile.mkdtemp(prefix="fedlora-sandbox-"))
    token = "fedlora-sandbox-done-" + secrets.token_hex(8)
    try:
        work = root / "work"
        work.mkdir()
        candidate, runner, out_path = root / "candidate.py", root / "runner.py", root / "output.txt"
        candidate.write_text(program, encoding="utf-8")
        cpu = int(timeout) + 2
        runner.write_text(_PRELUDE.format(token=token, candidate=str(candidate), memory=memory_mb * 2**20,
                                          fsize=max_file_mb * 2**20, cpu=cpu), encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        t0 = time.perf_counter()
        with open(out_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-I", "-B", str(runner)], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            status = None
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_group(proc.pid)  # the program and anything it left behind
                proc.wait()
        seconds = time.perf_counter() - t0
        output = _tail(out_path, max_output)
        finished = output.rstrip().endswith(token)
        output = output.replace(token, "").rstrip()
        if status is None:
            status = "passed" if proc.returncode == 0 and finished else "failed"
        return RunResult(passed=status == "passed", status=status, output=output, seconds=seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - n))
        return f.read().decode("utf-8", errors="replace")
