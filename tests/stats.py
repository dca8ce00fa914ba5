"""Exact bounds for statistical checks in tests, so that a correct implementation fails them with a known,
negligible probability."""

from __future__ import annotations

import math

import numpy as np


def binomial_range(trials: int, p: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per success probability ``p`` (m,): the counts ``(low, high)`` (m,) int of Binomial(trials, p), from its
    exact distribution, with P(X < low) <= alpha / 2 and P(X > high) <= alpha / 2.

    Normal-approximation bounds (k standard deviations) are far too tight in the tail of a small p: with 400
    trials, p = 0.003 passes 5 of them 2.4e-4 of the time, not 6e-7.
    """
    k = np.arange(trials + 1)  # (K,)
    log_choose = np.array([math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) for i in k])
    p = np.asarray(p, dtype=np.float64)[:, None]  # (m, 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) where p is 0 or 1: those terms are masked
        log_pmf = (log_choose + np.where(k > 0, k * np.log(p), 0.0)
                   + np.where(k < trials, (trials - k) * np.log1p(-p), 0.0))  # (m, K)
    pmf = np.exp(log_pmf)
    at_most = np.cumsum(pmf, axis=1)  # P(X <= k), each tail summed from its own end
    at_least = np.cumsum(pmf[:, ::-1], axis=1)[:, ::-1]  # P(X >= k)
    return (at_most <= alpha / 2).sum(axis=1), trials - (at_least <= alpha / 2).sum(axis=1)
