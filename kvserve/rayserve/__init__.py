"""`kvserve ray-serve`: the same engine and server as `kvserve serve`, as Ray Serve deployments (docs/scaleout.md).

Only kvserve.rayserve.deployments and .launch import ray; the rest is plain Python, tested without a cluster."""
