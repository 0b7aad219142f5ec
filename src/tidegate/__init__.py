"""tidegate: one Python program for Kubernetes load balancing (Gateway API, Ingress, LoadBalancer Services)."""

from tidegate import compiled as _compiled

__version__ = "0.1.0"

_compiled.choose()  # the compiled copies of the hot modules, or their Python sources (see compiled.py)
