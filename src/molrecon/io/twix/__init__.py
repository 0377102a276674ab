"""Siemens twix raw data (``.dat``): the reader is :mod:`.reader`."""

from __future__ import annotations

from .reader import is_twix, read_twix

__all__ = ["is_twix", "read_twix"]
