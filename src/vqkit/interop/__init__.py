"""Converters from other libraries' checkpoints into vqkit models."""

from .taming import convert_taming_checkpoint

__all__ = ["convert_taming_checkpoint"]
