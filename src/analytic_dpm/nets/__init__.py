"""Noise-prediction networks eps_theta(x_t, t)."""

from analytic_dpm.nets.unet import UNet, attention_in_float32, set_attention_float32, timestep_embedding

__all__ = ["UNet", "attention_in_float32", "set_attention_float32", "timestep_embedding"]
