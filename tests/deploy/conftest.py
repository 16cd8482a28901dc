"""Deployment files: Kubernetes and KServe manifests against their schemas, the container files against each other.

Fixtures only; what they are built from lives in tests/helpers/."""
