"""The reverse-variance methods (spec sections 4 and 11) and the forward process each one belongs to."""

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
#: the covariance-head methods (spec section 11): per-pixel sigma^2 = lambda^2 + c^2 clip(Chat(x_t)), Chat from
#: a second network output (SN: h ~ E[eps^2 | x_t]; NPR: g ~ E[(eps - epshat)^2 | x_t]).
HEAD_METHODS: dict[str, str] = {
    "sn_ddpm": "ddpm",
    "npr_ddpm": "ddpm",
    "sn_ddim": "ddim",
    "npr_ddim": "ddim",
}
ALL_METHODS: dict[str, str] = {**METHODS, **HEAD_METHODS}
HEAD_KINDS = ("sn", "npr")
FORWARDS = ("ddpm", "ddim")
ANALYTIC_METHODS = ("analytic_ddpm", "analytic_ddim")


def check_method(method: str) -> str:
    """Return the forward process of ``method`` (any name of ALL_METHODS); ValueError naming the choices if unknown."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(ALL_METHODS)}")
    return ALL_METHODS[method]


def check_forward(forward: str) -> str:
    if forward not in FORWARDS:
        raise ValueError(f"unknown forward process {forward!r}; choose one of {', '.join(FORWARDS)}")
    return forward


def needs_gamma(method: str) -> bool:
    check_method(method)
    return method in ANALYTIC_METHODS


def head_kind(method: str) -> str | None:
    """``"sn"`` or ``"npr"`` for a covariance-head method, None for the five isotropic methods."""
    check_method(method)
    return method.split("_", 1)[0] if method in HEAD_METHODS else None


def needs_head(method: str) -> bool:
    """Whether ``method`` needs a head model ``model(x_t, t) -> (eps_hat, head)`` (spec section 11)."""
    return head_kind(method) is not None
