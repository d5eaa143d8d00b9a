"""Regions together (issue #21): every head stays a complete front door and joins a federation
through NATS JetStream. Each head runs its own nats-server (natsd.py); the other regions' heads
read its streams: the key records (keysync.py), the usage records (service.py, kept in fedstore.py) and the capacity
summaries (capacity.py). A request the region cannot serve is replayed to the nearest region
that can (spill.py). Off by default: without `[federation] enabled` a head is the island it was."""
