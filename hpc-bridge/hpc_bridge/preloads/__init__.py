"""Dask scheduler preloads shipped as source text.

A module here is copied into a cluster's staging directory and passed to the scheduler as
`--preload <path>`, because the compute nodes may not have this package installed; each one
therefore imports only the standard library, dask and distributed. Read one's source with
`importlib.resources.files("hpc_bridge.preloads").joinpath("scaling.py").read_text()`.
"""
