"""A watchdog for a local Ray instance: when the driver that started it dies — killed, even with
SIGKILL, which no handler sees — the processes Ray left behind are ended.

Ray's GCS and raylet die with their driver, but their agents (the dashboard agent and the
runtime-env agent) wait on the dead GCS for a minute or more, and in a container whose init does
not reap them they stay as zombies. The reaper is started beside the driver in a session of its
own: while the driver lives it notes every process descending from it (pid and start time, so a
reused pid is never mistaken); when its pipe from the driver closes, it waits a moment for Ray's
own shutdown, then kills what is left of those.

    python -m prunerzero.fitness.reaper DRIVER_PID   (stdin: the pipe from the driver)
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 2.0


def start_reaper() -> subprocess.Popen:
    """Start the reaper for this process; keep the returned Popen (its stdin is the pipe)."""
    return subprocess.Popen([sys.executable, "-m", "prunerzero.fitness.reaper", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def stop_reaper(reaper: subprocess.Popen | None) -> None:
    """The driver is done with Ray: let the reaper clean up and exit."""
    if reaper is not None and reaper.stdin is not None and not reaper.stdin.closed:
        reaper.stdin.close()


def _descendants(driver: psutil.Process, seen: dict[int, float]) -> None:
    me = os.getpid()
    for child in driver.children(recursive=True):
        if child.pid != me:
            try:
                seen.setdefault(child.pid, child.create_time())
            except psutil.NoSuchProcess:
                pass


def _driver_gone(driver: psutil.Process) -> bool:
    """The pipe from the driver closed (end of file), or the driver is gone."""
    ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
    if ready and not os.read(sys.stdin.fileno(), 4096):
        return True
    return not driver.is_running()


def main(argv: list[str]) -> None:
    try:
        driver = psutil.Process(int(argv[0]))
    except (IndexError, ValueError, psutil.NoSuchProcess):
        return
    seen: dict[int, float] = {}
    while True:
        try:
            _descendants(driver, seen)
        except psutil.NoSuchProcess:
            break
        if _driver_gone(driver):
            break
    time.sleep(GRACE_S)
    for pid, started in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    main(sys.argv[1:])
