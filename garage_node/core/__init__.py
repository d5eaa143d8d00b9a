"""Pieces shared by the node and the head: typed settings and wire messages, the clock,
process supervision, tokens, WireGuard, files, systemd notification. Nothing here imports
fastapi, pydantic, uvicorn or ray."""
