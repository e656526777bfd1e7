"""Random-LTD metrics, written through DeepSpeed's monitor (W&B, TensorBoard and CSV blocks of the config).

Keys (x-axis: ``engine.global_samples``, the step DeepSpeed's own ``Train/Samples/*`` events use; W&B drops any
event whose step is below the last one logged, so a different x-axis would lose every random-LTD point):
    random_ltd/kept_length             kept tokens of the random-LTD layers in the step just taken (mean over layers)
    random_ltd/consumed_layer_tokens   layer-tokens run so far, all data-parallel ranks together
    random_ltd/baseline_layer_tokens   what full-length training would have run
    random_ltd/saved_percent           100 * (1 - consumed / baseline)
    random_ltd/lr                      learning rate of the first param group
    random_ltd/tokens_per_s            training tokens per second over the last step
"""

from __future__ import annotations

import netrc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["RandomLTDMonitor", "METRIC_KEYS", "wandb_credentials_configured"]


def wandb_credentials_configured(environ: dict[str, str] | None = None) -> bool:
    """Whether W&B can log online without asking: ``WANDB_API_KEY`` set, or a ``wandb login`` entry in the netrc
    file (``NETRC`` or ``~/.netrc``) for the W&B host (``WANDB_BASE_URL``, default api.wandb.ai)."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(env.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])

METRIC_KEYS = (
    "random_ltd/kept_length",
    "random_ltd/consumed_layer_tokens",
    "random_ltd/baseline_layer_tokens",
    "random_ltd/saved_percent",
    "random_ltd/lr",
    "random_ltd/tokens_per_s",
)


@dataclass
class RandomLTDMonitor:
    """Computes the per-step metrics and hands them to ``engine.monitor`` (DeepSpeed writes on rank 0 only)."""

    enabled: bool = True
    start_time: float = field(default_factory=time.perf_counter)
    _last_time: float | None = None
    _last_tokens: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def metrics(self, engine: Any) -> dict[str, float]:
        sched = engine.random_ltd_schedule
        now = time.perf_counter()
        since = now - (self._last_time if self._last_time is not None else self.start_time)
        tokens = sched.consumed_tokens - self._last_tokens
        self._last_time, self._last_tokens = now, sched.consumed_tokens
        kept = list(engine.random_ltd_state.kept_lengths.values())
        seq_len = sched.consumed_tokens // sched.consumed_samples if sched.consumed_samples else 0
        kept_now = min(sum(kept) / len(kept), seq_len) if kept and self.enabled else seq_len
        lrs = engine.get_lr() if hasattr(engine, "get_lr") else []
        return {
            "random_ltd/kept_length": float(kept_now),
            "random_ltd/consumed_layer_tokens": float(sched.consumed_layer_tokens),
            "random_ltd/baseline_layer_tokens": float(sched.baseline_layer_tokens),
            "random_ltd/saved_percent": 100.0 * sched.saved_fraction,
            "random_ltd/lr": float(lrs[0]) if lrs else float("nan"),
            "random_ltd/tokens_per_s": tokens / since if since > 0 else 0.0,
        }

    def on_step(self, engine: Any) -> None:
        self.last = self.metrics(engine)
        monitor = getattr(engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            step = getattr(engine, "global_samples", engine.random_ltd_schedule.step)
            monitor.write_events([(k, v, step) for k, v in self.last.items()])

    def summary(self, engine: Any) -> str:
        sched = engine.random_ltd_schedule
        elapsed = time.perf_counter() - self.start_time
        mode = "random-LTD" if self.enabled else "baseline (no dropping)"
        return (f"{mode}: {sched.step} steps, {sched.consumed_tokens:,} tokens, layer-tokens "
                f"{sched.consumed_layer_tokens:,} of {sched.baseline_layer_tokens:,} baseline "
                f"({100 * sched.saved_fraction:.1f}% saved), {elapsed:.1f}s, "
                f"{sched.consumed_tokens / elapsed if elapsed else 0:,.0f} tokens/s")
