"""Plumbing every job shares: errors, atomic files and the numpy-only unpickler, image reading,
devices and dtypes, reader workers, torch.distributed helpers. Imports nothing else of optvq."""

__version__ = "0.1.0"  # the package version (pyproject.toml says the same)
