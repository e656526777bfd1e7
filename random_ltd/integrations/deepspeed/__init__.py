"""DeepSpeed: ``initialize`` (a drop-in for ``deepspeed.initialize``), the engine mixin it installs, and DeepSpeed's
own random-LTD API (``convert_to_random_ltd(engine, LayerClass)``, ``engine.random_ltd_scheduler``; see ``compat``)."""

from random_ltd.integrations.deepspeed.compat import (
    RandomLTDSchedulerView,
    convert_to_random_ltd,
    remove_random_ltd_state_dict,
    save_without_random_ltd,
)
from random_ltd.integrations.deepspeed.engine import RandomLTDEngineMixin, deepspeed_view_of_config, initialize

__all__ = [
    "initialize",
    "RandomLTDEngineMixin",
    "deepspeed_view_of_config",
    "RandomLTDSchedulerView",
    "convert_to_random_ltd",
    "save_without_random_ltd",
    "remove_random_ltd_state_dict",
]
