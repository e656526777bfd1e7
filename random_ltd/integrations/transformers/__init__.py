"""Hugging Face transformers adapters (importing this subpackage needs ``transformers``; the core package does not).

- ``convert`` / ``RandomLTDTrainer`` / ``RandomLTDCallback``: random-LTD for GPT-2, BERT/RoBERTa, Llama-style and
  ViT layers; the callback gives it to any ``Trainer`` subclass (TRL's ``SFTTrainer``, PEFT models). Both are
  imported on first use (``transformers.Trainer`` needs ``accelerate``);
- ``skip_layer.convert_to_skip_layer``: SkipLayer for GPT2Block and LlamaDecoderLayer;
- ``hadskip.HadSkipForSequenceClassification``: HadSkip gates for BERT/RoBERTa encoders.
"""

from random_ltd.integrations.transformers.convert import HFRandomLTDLayer, convert, load_random_ltd_config

__all__ = ["convert", "HFRandomLTDLayer", "load_random_ltd_config", "RandomLTDTrainer", "RandomLTDCallback"]


def __getattr__(name: str):
    if name == "RandomLTDTrainer":
        from random_ltd.integrations.transformers.trainer import RandomLTDTrainer

        return RandomLTDTrainer
    if name == "RandomLTDCallback":
        from random_ltd.integrations.transformers.callback import RandomLTDCallback

        return RandomLTDCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
