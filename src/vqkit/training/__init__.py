from .config import ConfigError, DataConfig, OptimConfig, TrainConfig, list_presets, resolve_config
from .run import train_tokenizer
from .trainer import Trainer

__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "ConfigError", "resolve_config", "list_presets",
           "train_tokenizer", "Trainer"]
