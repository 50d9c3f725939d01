"""difforge: fast, tested kernels for diffusion-model efficiency methods, as torch ops.

Kernels are registered as ``torch.ops.difforge.*``; ``difforge.ops`` holds their typed wrappers
and ``difforge.nn`` the modules built on them.
"""

import importlib.metadata

from difforge import _library

__version__ = importlib.metadata.version("difforge")
library_path = _library.load()

from difforge import nn, ops  # noqa: E402  (ops need the library loaded)

__all__ = ["__version__", "library_path", "nn", "ops"]
