"""Hugging Face transformers adapters (imported only when transformers is installed)."""
