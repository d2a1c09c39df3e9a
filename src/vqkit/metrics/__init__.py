from .codebook import code_histogram, codebook_stats
from .image import psnr_per_image, ssim_per_image

__all__ = ["psnr_per_image", "ssim_per_image", "code_histogram", "codebook_stats"]
