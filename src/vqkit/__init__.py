"""vqkit: discrete image tokenizers (VQ-VAE, VQGAN), token priors and their applications."""

__version__ = "0.1.0"

from .models import VQModel, VQModelConfig  # noqa: E402
from .quantizers import VectorQuantizer  # noqa: E402

__all__ = ["VQModel", "VQModelConfig", "VectorQuantizer", "__version__"]
