"""End a rank when the launcher that started it dies, instead of training on as an orphan.

The ``deepspeed`` command starts ``python -m deepspeed.launcher.launch``, which starts the ranks. Killing the
``deepspeed`` command (SIGKILL, or SIGTERM on one node: it installs no handler) leaves ``launch`` and the ranks
running; killing ``launch`` with SIGKILL leaves the ranks running. They keep training and writing checkpoints into
a directory another run may be using. ``exit_with_launcher`` makes the calling rank end itself when either dies:

- its parent: Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` through ctypes where available, plus a watchdog thread
  polling ``os.getppid()`` (portable fallback);
- when the parent is DeepSpeed's ``launch``: the process that started it (the ``deepspeed`` command), watched by the
  same thread through the parent's own parent id (``/proc/<ppid>/stat``), which changes when it dies.

On a death the rank logs why, sends itself SIGTERM and, if that is handled and does not end it, exits after a grace
period. ``RANDOM_LTD_EXIT_WITH_LAUNCHER=0`` switches this off, ``=1`` also arms it under a parent that is not a
DeepSpeed launcher (by default only DeepSpeed's launcher is watched, so a run started from an interactive shell
survives that shell).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

__all__ = ["ENV_VAR", "exit_with_launcher", "release_shm_buffers"]

logger = logging.getLogger("random_ltd")

ENV_VAR = "RANDOM_LTD_EXIT_WITH_LAUNCHER"
_PR_SET_PDEATHSIG = 1
_armed: list[int] | None = None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc (None if unknown: no /proc, or ``pid`` is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[1])  # fields after "(comm)": state, ppid, ...
    except (ValueError, IndexError):
        return None


def _is_deepspeed_launch(pid: int) -> bool:
    return "deepspeed.launcher.launch" in _cmdline(pid)


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _terminate(reason: str, grace_s: float) -> None:
    print(f"random-LTD: {reason}; ending this rank (pid {os.getpid()})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(128 + signal.SIGTERM)


def _watch(parent: int, grandparent: int | None, poll_s: float, grace_s: float) -> None:
    while True:
        if os.getppid() != parent:
            _terminate(f"the launcher process {parent} died", grace_s)
            return
        if grandparent is not None and _parent_of(parent) not in (grandparent, None):
            _terminate(f"the process {grandparent} that started the launcher died", grace_s)
            return
        time.sleep(poll_s)


def exit_with_launcher(*, poll_s: float = 0.5, grace_s: float = 10.0) -> list[int]:
    """Arm the guard for this process (idempotent); returns the watched pids (empty when not armed).

    Armed when the parent is DeepSpeed's launcher (``deepspeed.launcher.launch``), or always with
    ``RANDOM_LTD_EXIT_WITH_LAUNCHER=1``; never with ``=0``.
    """
    global _armed
    if _armed is not None:
        return list(_armed)
    mode = os.environ.get(ENV_VAR, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0, 1 or auto, got {os.environ[ENV_VAR]!r}")
    parent = os.getppid()
    launcher = _is_deepspeed_launch(parent)
    if mode == "0" or (mode == "auto" and not launcher) or parent == 1:
        _armed = []
        return []
    _set_parent_death_signal(signal.SIGTERM)
    grandparent = _parent_of(parent) if launcher else None
    if grandparent in (0, 1):
        grandparent = None
    _armed = [parent] + ([grandparent] if grandparent is not None else [])
    if os.getppid() != parent:  # the parent died before the death signal was armed
        _terminate(f"the launcher process {parent} died", grace_s)
    threading.Thread(target=_watch, args=(parent, grandparent, poll_s, grace_s), name="random-ltd-launcher-guard",
                     daemon=True).start()
    logger.info("random-LTD: this rank ends if its launcher dies (watching pids %s)", _armed)
    return list(_armed)


SHM_DIR = "/dev/shm"


def release_shm_buffers() -> str | None:
    """Unlink this rank's DeepSpeed CPU allreduce buffer name, so no run leaves 69 MB per rank in /dev/shm.

    DeepSpeed's CPU accelerator (``deepspeed.init_distributed`` with every rank on one node, ``LOCAL_SIZE`` = world
    size) creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` for each rank and
    never unlinks it (its ``shared_close`` is never called), so every run, finished or killed, leaks one per rank
    until /dev/shm fills memory. Each rank maps every other rank's buffer before ``init_distributed`` returns, so
    after a barrier the names are no longer needed: the mappings stay valid, and the memory is freed when the last
    rank exits however it ends. Call after ``deepspeed.init_distributed``; a no-op on GPU, without the buffer, or
    before torch.distributed is initialised. Returns the removed path, if any.
    """
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() or not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    if str(world) != os.environ.get("LOCAL_SIZE", ""):
        return None  # DeepSpeed made no shm buffers (ranks on several nodes)
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    path = os.path.join(SHM_DIR, name)
    dist.barrier()  # every rank has mapped every buffer
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # never fail a run over it
        logger.warning("random-LTD: could not remove DeepSpeed's shm buffer %s: %s", path, exc)
        return None
    return path
