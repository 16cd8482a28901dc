"""Running the server: Prometheus metrics, the per-call access record and its log line (for every door), and
the count of calls a drain waits for."""
