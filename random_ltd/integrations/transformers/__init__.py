"""Hugging Face transformers adapters (importing this subpackage needs ``transformers``; the core package does not).

- ``convert`` / ``RandomLTDTrainer``: random-LTD for GPT-2, BERT/RoBERTa, Llama-style and ViT layers
  (``RandomLTDTrainer`` is imported on first use: ``transformers.Trainer`` needs ``accelerate``);
- ``skip_layer.convert_to_skip_layer``: SkipLayer for GPT2Block and LlamaDecoderLayer;
- ``hadskip.HadSkipForSequenceClassification``: HadSkip gates for BERT/RoBERTa encoders.
"""

from random_ltd.integrations.transformers.convert import HFRandomLTDLayer, convert, load_random_ltd_config

__all__ = ["convert", "HFRandomLTDLayer", "load_random_ltd_config", "RandomLTDTrainer"]


def __getattr__(name: str):
    if name == "RandomLTDTrainer":
        from random_ltd.integrations.transformers.trainer import RandomLTDTrainer

        return RandomLTDTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
