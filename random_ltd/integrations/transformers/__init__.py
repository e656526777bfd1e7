"""Hugging Face transformers: ``convert`` (random-LTD for GPT-2, BERT/RoBERTa, Llama-style, ViT layers) and the
Trainer integration. Importing this subpackage needs ``transformers``; the core package does not."""

from random_ltd.integrations.transformers.convert import HFRandomLTDLayer, convert, load_random_ltd_config

__all__ = ["convert", "HFRandomLTDLayer", "load_random_ltd_config"]
