"""The five reverse-variance methods of spec section 4 and the forward process each one belongs to."""

from __future__ import annotations

#: method name -> forward process (spec section 4). These names are used everywhere:
#: configs, result tables and W&B keys.
METHODS: dict[str, str] = {
    "ddpm_beta": "ddpm",  # sigma^2 = beta_{t|s}
    "ddpm_beta_tilde": "ddpm",  # sigma^2 = btilde_{s|t}
    "analytic_ddpm": "ddpm",  # Theorem 1 with Monte-Carlo Gamma, clipped by Theorem 2
    "ddim": "ddim",  # sigma^2 = eta^2 btilde_{s|t}
    "analytic_ddim": "ddim",  # Theorem 1 on the DDIM forward process
}
FORWARDS = ("ddpm", "ddim")
ANALYTIC_METHODS = ("analytic_ddpm", "analytic_ddim")


def check_method(method: str) -> str:
    """Return the forward process of ``method``; ValueError naming the choices if unknown."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


def check_forward(forward: str) -> str:
    if forward not in FORWARDS:
        raise ValueError(f"unknown forward process {forward!r}; choose one of {', '.join(FORWARDS)}")
    return forward


def needs_gamma(method: str) -> bool:
    check_method(method)
    return method in ANALYTIC_METHODS
