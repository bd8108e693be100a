"""Reusable building blocks; import from the submodules."""
