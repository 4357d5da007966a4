"""A computation to run on the quick-start cluster: `dask-hpc up` sets DASK_SCHEDULER_ADDRESS."""

import dask.array as da
from distributed import Client

with Client() as client:  # connects to $DASK_SCHEDULER_ADDRESS
    workers = client.scheduler_info()["workers"]
    print(f"connected to {client.scheduler.address} with {len(workers)} workers")
    x = da.random.default_rng(42).random((4000, 4000), chunks=(1000, 1000))
    result = (x @ x.T).mean().compute()
    print(f"mean of x @ x.T over a 4000x4000 array in 16 chunks: {result:.4f}")
