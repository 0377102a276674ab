"""The guarantees of MOL, measured (see :mod:`molrecon.guarantees.certificate`)."""

from .certificate import *
from .certificate import __all__  # noqa: F401
