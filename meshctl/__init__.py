"""meshctl: run a federated data mesh from one mesh.yaml."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
"""Wire protocol version; the plan pins it and peers of another version are refused."""
