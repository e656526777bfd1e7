"""Hugging Face transformers: ``convert`` (random-LTD for GPT-2, BERT/RoBERTa, Llama-style, ViT layers) and
``RandomLTDTrainer``. Importing this subpackage needs ``transformers``; the core package does not.
``RandomLTDTrainer`` is imported on first use (``transformers.Trainer`` needs ``accelerate``)."""

from random_ltd.integrations.transformers.convert import HFRandomLTDLayer, convert, load_random_ltd_config

__all__ = ["convert", "HFRandomLTDLayer", "load_random_ltd_config", "RandomLTDTrainer"]


def __getattr__(name: str):
    if name == "RandomLTDTrainer":
        from random_ltd.integrations.transformers.trainer import RandomLTDTrainer

        return RandomLTDTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
