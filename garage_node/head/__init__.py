"""The regional head: its config and CA, the registry of tokens and nodes, the control API,
the service that keeps the WireGuard hub and the Ray head, and the operator's fleet view."""
