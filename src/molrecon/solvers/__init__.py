"""Iterative solvers over plain callables."""

from .cg import CGResult, conjugate_gradient

__all__ = ["CGResult", "conjugate_gradient"]
