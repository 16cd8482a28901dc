"""`make bench`: a load generator against a real server, the in-process limit, batching off; JSON, plot, report."""
