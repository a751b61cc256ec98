"""Kernels over the unified pool (``pagedlora.kernels``): torch references used on the CPU."""
