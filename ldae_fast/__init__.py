"""ldae-fast: latent Denoising Autoencoder pretraining with fused Triton kernels."""

__version__ = "0.1.0"
