"""The Beta distribution's CDF and quantile, for the "beta" sigma schedule (scipy is not a dependency).

The CDF is the regularized incomplete beta function ``I_x(a, b)``, evaluated by its continued fraction (DLMF 8.17.22)
with the modified Lentz method; the quantile inverts it by bisection. Both work on float64 tensors elementwise.
"""

from __future__ import annotations

import math

import torch

# Lentz's guard against a zero denominator, and the continued fraction's stopping tolerance.
_TINY = 1e-300
_TOLERANCE = 1e-15
_MAX_TERMS = 500
_BISECTIONS = 60  # halves the unit interval to below float64 resolution


def _check_shape(a: float, b: float) -> None:
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"the Beta distribution needs shape parameters a > 0 and b > 0, got a={a}, b={b}.")


def _continued_fraction(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + d1 / (1 + d2 / (1 + ...)))`` of DLMF 8.17.22 (modified Lentz); converges fast for
    ``x < (a + 1) / (a + b + 2)``. x, a, b: float64 tensors of one shape."""
    f = torch.full_like(x, _TINY)
    c = f.clone()
    d = torch.zeros_like(x)
    for j in range(1, 2 * _MAX_TERMS):
        if j == 1:
            numerator = torch.ones_like(x)
        else:
            m, odd = divmod(j - 1, 2)  # the partial numerator d_(j-1), with j - 1 = 2m + odd
            if odd:
                numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            else:
                numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + numerator * d
        d = torch.where(d.abs() < _TINY, _TINY, d).reciprocal()
        c = 1.0 + numerator / c
        c = torch.where(c.abs() < _TINY, _TINY, c)
        delta = c * d
        f = f * delta
        if j > 1 and bool(((delta - 1.0).abs() < _TOLERANCE).all()):
            break
    return f


def beta_cdf(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``P(X <= x)`` for ``X ~ Beta(a, b)``: the regularized incomplete beta function. x: any shape, float64."""
    _check_shape(a, b)
    x = x.to(torch.float64)
    inner = x.clamp(_TINY, 1.0)
    # The fraction converges quickly only below about the mean; above it, use I_x(a, b) = 1 - I_(1-x)(b, a).
    flip = inner > (a + 1.0) / (a + b + 2.0)
    y = torch.where(flip, 1.0 - inner, inner).clamp_min(_TINY)
    p = torch.where(flip, torch.full_like(x, b), torch.full_like(x, a))
    r = torch.where(flip, torch.full_like(x, a), torch.full_like(x, b))
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    tail = (p * y.log() + r * torch.log1p(-y) - log_beta).exp() * _continued_fraction(y, p, r) / p
    cdf = torch.where(flip, 1.0 - tail, tail)
    return torch.where(x <= 0.0, 0.0, torch.where(x >= 1.0, 1.0, cdf))


def beta_ppf(q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The quantile (inverse CDF) of ``Beta(a, b)`` at probabilities ``q`` in [0, 1]: any shape, float64.

    ``ppf(0) = 0`` and ``ppf(1) = 1`` exactly; in between, bisection on :func:`beta_cdf` to float64 resolution.
    """
    _check_shape(a, b)
    q = q.to(torch.float64)
    if bool(((q < 0) | (q > 1) | q.isnan()).any()):
        raise ValueError("Beta quantiles need probabilities q in [0, 1].")
    low, high = torch.zeros_like(q), torch.ones_like(q)
    for _ in range(_BISECTIONS):
        mid = 0.5 * (low + high)
        below = beta_cdf(mid, a, b) < q
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    x = 0.5 * (low + high)
    return torch.where(q <= 0.0, 0.0, torch.where(q >= 1.0, 1.0, x))
