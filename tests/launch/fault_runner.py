"""Run a training script under the ``deepspeed`` launcher with one deterministic fault (tests/launch only).

The launcher runs ``python fault_runner.py --local_rank=N ARGS``; this installs the fault named by the environment
on the rank it targets and then runs ``$RANDOM_LTD_TEST_SCRIPT`` as ``__main__`` with the same arguments. Nothing in
the library knows about it, so the same faults hit any version of the code.

``RANDOM_LTD_TEST_KILL_AT``:

* ``save:<rank>:<substring>``: on global rank ``<rank>``, the first ``torch.save`` to a path containing
  ``<substring>`` writes the file, truncates it to half (a write cut short) and SIGKILLs the process;
* ``step:<rank>:<n>``: on global rank ``<rank>``, SIGKILL inside the optimizer step that would complete step
  ``<n>`` (forward and backward done, weights not yet updated).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str, rank: int) -> None:
    kind, target, arg = spec.split(":", 2)
    if int(target) != rank:
        return
    if kind == "save":
        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if isinstance(f, (str, os.PathLike)) and arg in os.fspath(f):
                os.truncate(f, os.path.getsize(f) // 2)
                print(f"fault_runner: rank {rank} killed mid-write of {os.fspath(f)}", file=sys.stderr)
                _die()

        torch.save = save
    elif kind == "step":
        from deepspeed.runtime.engine import DeepSpeedEngine

        n = int(arg)
        real_step = DeepSpeedEngine._take_model_step

        def take_model_step(self, *args, **kwargs):
            if self.global_steps + 1 == n:
                print(f"fault_runner: rank {rank} killed inside optimizer step {n}", file=sys.stderr)
                _die()
            return real_step(self, *args, **kwargs)

        DeepSpeedEngine._take_model_step = take_model_step
    else:
        raise SystemExit(f"fault_runner: unknown fault kind {kind!r} in RANDOM_LTD_TEST_KILL_AT={spec!r}")


def main() -> None:
    script = os.environ["RANDOM_LTD_TEST_SCRIPT"]
    spec = os.environ.get("RANDOM_LTD_TEST_KILL_AT")
    if spec:
        install(spec, int(os.environ.get("RANK", "0")))
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
