"""Noise-prediction networks eps_theta(x_t, t), and their covariance heads (SN / NPR-DPM)."""

from analytic_dpm.nets.heads import HEAD_KINDS, HEAD_MODES, CovarianceHead, HeadUNet
from analytic_dpm.nets.unet import UNet, attention_in_float32, set_attention_float32, timestep_embedding

__all__ = [
    "HEAD_KINDS",
    "HEAD_MODES",
    "CovarianceHead",
    "HeadUNet",
    "UNet",
    "attention_in_float32",
    "set_attention_float32",
    "timestep_embedding",
]
