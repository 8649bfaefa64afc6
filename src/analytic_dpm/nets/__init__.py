"""Noise-prediction networks eps_theta(x_t, t)."""

from analytic_dpm.nets.unet import UNet, timestep_embedding

__all__ = ["UNet", "timestep_embedding"]
