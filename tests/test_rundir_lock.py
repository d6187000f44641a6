"""The run directory's lock (``.running``) against pid reuse: a lock whose pid now belongs to another process (a
container or machine restart reuses low pids) is stale and taken over; a live holder is refused in one line that
names the way out."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.app.rundir import RunDir, lock_text
from fedlora.cli.main import main

linux = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not Path("/proc/sys/kernel/random/boot_id").exists(),
                           reason="start times and the boot id come from /proc")


@pytest.fixture
def holder():
    """A live process that is not a fedlora run."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@linux
def test_the_lock_records_pid_start_time_and_boot_id(tmp_path):
    run_dir = RunDir(tmp_path)
    assert run_dir.take() is True
    pid, start, boot = (tmp_path / ".running").read_text().split()
    stat = Path("/proc/self/stat").read_text()
    assert int(pid) == os.getpid() and start == stat[stat.rindex(")") + 2 :].split()[19] and boot == boot_id()
    assert run_dir.take() is None  # this process holds it
    run_dir.release()
    assert not (tmp_path / ".running").exists()


@linux
def test_a_live_holder_is_refused_and_a_reused_pid_or_another_boot_is_stale(tmp_path, holder):
    run_dir = RunDir(tmp_path)
    lock = tmp_path / ".running"
    lock.write_text(lock_text(holder.pid))
    assert run_dir.take() is False
    with pytest.raises(ValueError, match=f"being written by process {holder.pid}") as err:
        with run_dir.hold():
            pass
    assert f"delete {str(lock)!r}" in str(err.value) and "\n" not in str(err.value)
    assert lock.read_text() == lock_text(holder.pid)  # a live holder's lock is left alone

    pid, start, boot = lock.read_text().split()
    for stale in (f"{pid} {int(start) + 1} {boot}",  # the pid was reused by a process started later
                  f"{pid} {start} {'0' * 8}-{boot[9:]}"):  # written before a reboot
        lock.write_text(stale)
        assert run_dir.take() is True, stale
        assert lock.read_text() == lock_text(os.getpid())
        run_dir.release()

    # our own pid in a lock from before a restart: not ours, taken over and then given back
    lock.write_text(f"{os.getpid()} 1 {boot}")
    with run_dir.hold():
        assert lock.read_text() == lock_text(os.getpid())
    assert not lock.exists()


def test_a_lock_with_the_pid_alone_still_counts_and_an_empty_one_only_briefly(tmp_path, holder):
    run_dir = RunDir(tmp_path)
    lock = tmp_path / ".running"
    lock.write_text(str(holder.pid))  # the format before start times were recorded
    assert run_dir.take() is False
    lock.write_text("")  # another process between creating the lock and writing it
    assert run_dir.take() is False
    old = time.time() - 60
    os.utime(lock, (old, old))  # left empty by a kill at that moment: stale after a few seconds
    assert run_dir.take() is True
    run_dir.release()
    lock.write_text("not a pid")
    assert run_dir.take() is True
    run_dir.release()


@linux
def test_fedlora_run_names_the_lock_to_delete_and_a_reused_pid_is_taken_over(small_csv, tmp_path, holder, capsys):
    """`fedlora run` beside a live holder: one line naming the lock file to delete, nothing written. The same lock
    once its pid runs another process (started at another time): taken over."""
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".running"
    lock.write_text(lock_text(holder.pid))
    argv = ["run", "--model", "tiny:bert", "--data", str(small_csv), "--clients", "3", "--rounds", "1", "--examples-per-client",
            "24", "--test-examples", "60", "--max-length", "32", "--local-steps", "1", "--batch-size", "4", "--quiet",
            "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlora: error:") and "\n" not in err and f"delete {str(lock)!r}" in err, err
    assert not (out / "metrics.jsonl").exists()

    pid, start, boot = lock.read_text().split()
    lock.write_text(f"{pid} {int(start) - 1} {boot}")  # what a restart leaves: the pid now runs something else
    with RunDir(out).hold():  # what `fedlora run` takes first (test_robustness runs one through a stale lock)
        assert lock.read_text() == lock_text(os.getpid())
    assert not lock.exists()
