"""Benchmarks of the operator against baselines run in the same process.

`python -m bench` (bench/__main__.py) runs the four sections of issue 9 side by side:
time to ready (bench.ready), control-plane calls (bench.calls), reconcile at scale
(bench.reconcile_scale) and teardown (bench.teardown). bench/autoscale.py is an older,
separate benchmark of the DaskAutoscaler and is run on its own.
"""
