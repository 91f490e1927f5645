"""The agreement and similarity metrics, by name (the documented module; they live in
:mod:`pytest_saliency.compare.metrics`, whose public names this module serves)."""

from .compare.metrics import *  # noqa: F401,F403
from .compare.metrics import __all__ as __all__
