"""Same names as ``deepspeed.runtime.data_pipeline.data_routing.helper``, so a DeepSpeed client changes only the
import line (``deepspeed.runtime.data_pipeline.data_routing`` -> ``random_ltd.integrations.deepspeed``).

The definitions live in :mod:`random_ltd.integrations.deepspeed.compat`.
"""

from random_ltd.integrations.deepspeed.compat import (
    convert_to_random_ltd,
    remove_random_ltd_state_dict,
    save_without_random_ltd,
)

__all__ = ["convert_to_random_ltd", "save_without_random_ltd", "remove_random_ltd_state_dict"]
