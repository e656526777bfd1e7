"""Crash-safe checkpoint protocol for the engine ``random_ltd.initialize`` returns.

DeepSpeed's ``save_checkpoint`` writes the shards straight into ``<dir>/<tag>`` and rank 0 writes ``latest`` as soon
as *its own* shards are done, so a rank killed mid-shard leaves ``latest`` naming a corrupt tag, and saving a tag
twice rewrites a complete checkpoint in place. Here instead:

1. the tag is refused if ``<dir>/<tag>`` already exists (a complete checkpoint is never rewritten);
2. every rank writes into ``<dir>/<tag>.incomplete`` (DeepSpeed's own save, with ``save_latest=False``);
3. barrier: every rank has finished its shards;
4. rank 0 renames ``<tag>.incomplete`` to ``<tag>`` (atomic) and then replaces ``latest`` atomically (temp file +
   ``os.replace``);
5. barrier.

A kill at any point leaves ``latest`` naming a complete tag (or absent), and a leftover ``*.incomplete`` directory,
which the next save of that tag removes. Loading resolves the tag first and raises ``CheckpointNotFoundError`` (a
``FileNotFoundError``) naming the path when an explicit tag, or the tag ``latest`` names, does not exist, instead of
DeepSpeed's bare ``AssertionError``.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

__all__ = [
    "INCOMPLETE_SUFFIX",
    "CheckpointNotFoundError",
    "atomic_save",
    "complete_tags",
    "read_latest",
    "rebuild_schedule_state",
    "resolve_load_tag",
    "write_latest",
]

logger = logging.getLogger("random_ltd")

#: suffix of the directory a tag is written into before every rank has finished (renamed away on completion)
INCOMPLETE_SUFFIX = ".incomplete"


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint that was asked for does not exist (missing directory, missing ``latest``, dangling tag)."""


def read_latest(load_dir: str | os.PathLike, name: str = "latest") -> str | None:
    """The tag ``<load_dir>/<name>`` names; None if that file does not exist (CheckpointNotFoundError if empty)."""
    path = os.path.join(os.fspath(load_dir), name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag:
        raise CheckpointNotFoundError(f"{path} is empty: it names no checkpoint tag")
    return tag


def write_latest(save_dir: str | os.PathLike, tag: str, name: str = "latest") -> None:
    """Point ``<save_dir>/<name>`` at ``tag`` atomically: readers see the old tag or the new one, never a torn file."""
    save_dir = os.fspath(save_dir)
    final = os.path.join(save_dir, name)
    tmp = f"{final}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync(save_dir)


def complete_tags(load_dir: str | os.PathLike) -> list[str]:
    """The tag directories in ``load_dir`` that are not ``*.incomplete`` (sorted; empty if ``load_dir`` is missing)."""
    load_dir = os.fspath(load_dir)
    if not os.path.isdir(load_dir):
        return []
    return sorted(d for d in os.listdir(load_dir)
                  if os.path.isdir(os.path.join(load_dir, d)) and not d.endswith(INCOMPLETE_SUFFIX))


def _describe(load_dir: str) -> str:
    tags = complete_tags(load_dir)
    return f"complete tags there: {', '.join(tags)}" if tags else "it holds no complete checkpoint"


def _check_tag_name(tag: str) -> None:
    if not tag or tag in (".", "..") or "/" in tag or os.sep in tag:
        raise ValueError(f"checkpoint tag must be a plain directory name, got {tag!r}")
    if tag.endswith(INCOMPLETE_SUFFIX):
        raise ValueError(f"checkpoint tag {tag!r} ends with {INCOMPLETE_SUFFIX!r}, which marks unfinished saves")


def resolve_load_tag(load_dir: str | os.PathLike, tag: str | None = None, latest_name: str = "latest") -> str | None:
    """The tag to load from ``load_dir``: ``tag`` itself, else the one ``latest`` names.

    Returns None when ``tag`` is None and there is no ``latest`` file (or no ``load_dir`` at all): DeepSpeed's
    "nothing to load" case, which callers that require a checkpoint must turn into an error. Raises
    CheckpointNotFoundError when the tag (given, or named by ``latest``) is not a directory in ``load_dir``, or is an
    unfinished ``*.incomplete`` save.
    """
    load_dir = os.fspath(load_dir)
    source = "requested"
    if tag is None:
        if os.path.exists(load_dir) and not os.path.isdir(load_dir):
            raise CheckpointNotFoundError(f"checkpoint directory {load_dir} is not a directory")
        tag = read_latest(load_dir, latest_name)
        if tag is None:
            return None
        source = f"named by {os.path.join(load_dir, latest_name)}"
    tag = str(tag)
    path = os.path.join(load_dir, tag)
    if tag.endswith(INCOMPLETE_SUFFIX):
        raise CheckpointNotFoundError(f"checkpoint {path} ({source}) is an unfinished save; {_describe(load_dir)}")
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint tag {tag!r} ({source}) does not exist: no directory {path}; "
                                      f"{_describe(load_dir)}")
    return tag


def _fsync(path: str) -> None:
    """fsync a file or a directory, best effort (some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """Flush the files of a finished tag to disk before it is published by the rename (survives a power loss)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _any_rank(flag: bool, engine: Any) -> bool:
    """True if ``flag`` is true on any rank (all ranks must call this)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    import deepspeed.comm as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=engine.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed.comm as dist

        dist.barrier()


def atomic_save(engine: Any, deepspeed_save: Any, save_dir: str, tag: Any, client_state: dict, save_latest: bool,
                exclude_frozen_parameters: bool) -> bool:
    """Save through ``deepspeed_save`` (DeepSpeed's ``save_checkpoint``) with the protocol in the module docstring.

    Raises:
        FileExistsError: ``<save_dir>/<tag>`` already exists (on any rank); nothing was written.
        ValueError: an empty ``save_dir`` or a tag that is not a plain directory name.
    """
    if not save_dir:
        raise ValueError(f"save_dir must be a non-empty path, got {save_dir!r}")
    save_dir = os.fspath(save_dir)
    tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
    _check_tag_name(tag)
    if engine.checkpoint_engine.is_decoupled():
        # a decoupled (asynchronous) checkpoint engine writes after save_checkpoint returns: no rename possible
        logger.warning("random-LTD: decoupled checkpoint engine %s: saving with DeepSpeed's own protocol (not "
                       "crash-safe)", type(engine.checkpoint_engine).__name__)
        return deepspeed_save(save_dir, tag=tag, client_state=client_state, save_latest=save_latest,
                              exclude_frozen_parameters=exclude_frozen_parameters)
    final = os.path.join(save_dir, tag)
    if _any_rank(os.path.exists(final), engine):
        raise FileExistsError(f"checkpoint {final} already exists; random-LTD never rewrites a checkpoint in place "
                              f"(save under a new tag, or remove that directory first)")
    staging_tag = tag + INCOMPLETE_SUFFIX
    staging = os.path.join(save_dir, staging_tag)
    # DeepSpeed's "rank 0" for file-system work: per node with node-local storage, else global
    fs_rank = engine.local_rank if engine.use_node_local_storage() else engine.global_rank
    if fs_rank == 0 and os.path.exists(staging):
        logger.warning("random-LTD: removing %s, left by an unfinished save", staging)
        shutil.rmtree(staging)
    _barrier()
    deepspeed_save(save_dir, tag=staging_tag, client_state=client_state, save_latest=False,
                   exclude_frozen_parameters=exclude_frozen_parameters)  # ends with a barrier: all shards written
    if fs_rank == 0:
        _fsync_tree(staging)
        os.rename(staging, final)
        _fsync(save_dir)
    _barrier()  # the tag is in place on every node before anyone names it
    if save_latest and engine.global_rank == 0:
        write_latest(save_dir, tag)
    _barrier()
    return True


def rebuild_schedule_state(schedule: Any, steps: int, batch_size: int) -> None:
    """Set an ``MSLGSchedule``'s counters to those of ``steps`` optimizer steps of ``batch_size`` full-length samples.

    Used when a checkpoint holds no random-LTD state: the kept length and the planned layer-token counts are pure
    functions of the step and the batch (samples of ``max_value`` tokens), so the schedule continues at the engine's
    global step instead of restarting at 0 while the weights continue.
    """
    from random_ltd.schedules.mslg import planned_layer_tokens, schedule_snapshot

    consumed, baseline = planned_layer_tokens(schedule.config, steps, batch_size)
    samples = steps * batch_size
    schedule.load_state_dict({"step": steps, "consumed_layer_tokens": consumed, "baseline_layer_tokens": baseline,
                              "consumed_samples": samples, "consumed_tokens": samples * schedule.max_value,
                              "config": schedule_snapshot(schedule.config)})
