"""Serving simulation: requests, schedulers, paged KV and replicas over the step cost model."""
