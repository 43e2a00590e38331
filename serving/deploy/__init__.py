"""Redeploy tooling: `python -m serving.deploy` moves the `stable` and `canary` version labels of the served model
(canary, promote, rollback, retire) by editing the model config file and applying it to the model server."""
