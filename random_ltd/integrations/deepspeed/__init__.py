"""DeepSpeed: ``initialize`` (a drop-in for ``deepspeed.initialize``) and the engine mixin it installs."""

from random_ltd.integrations.deepspeed.engine import RandomLTDEngineMixin, deepspeed_view_of_config, initialize

__all__ = ["initialize", "RandomLTDEngineMixin", "deepspeed_view_of_config"]
