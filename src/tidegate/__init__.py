"""tidegate: one Python program for Kubernetes load balancing (Gateway API, Ingress, LoadBalancer Services)."""

from tidegate import compiled

__version__ = "0.1.0"

compiled.install()
