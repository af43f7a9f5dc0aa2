"""distconv: channel-, filter- and sample-parallel CNN training over MPI."""
from .backend import get_default_dtype, set_default_dtype

__version__ = "0.1.0"

__all__ = ["set_default_dtype", "get_default_dtype", "__version__"]
