"""tidegate: one Python program for Kubernetes load balancing (Gateway API, Ingress, LoadBalancer Services)."""

__version__ = "0.1.0"
