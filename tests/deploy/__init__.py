"""Deployment files: Kubernetes and KServe manifests against their schemas, the container files against each other."""
