from .autoencoder import Decoder, Encoder
from .tokenizer import VQModel, VQModelConfig, VQOutput

__all__ = ["Encoder", "Decoder", "VQModel", "VQModelConfig", "VQOutput"]
