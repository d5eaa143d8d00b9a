"""The region's front door: an OpenAI-compatible API on the head, routed to the PCs that serve
each model, with API keys, rate limits, a usage ledger and Prometheus metrics.

- `table`: which PCs serve which model now, from the heartbeats (no database read per request).
- `router`: the routing policy (least outstanding requests with prefix affinity), pure.
- `keys`, `ledger`: API keys and tokens used, in the head's gateway database (store.py).
- `enginekeys`: the per-PC secret each engine demands, so only the head can call an engine.
- `proxy`: one request to one PC, with failover before the first byte and SSE usage capture.
- `app`: the HTTP API; `metrics`: what Prometheus scrapes; `gateway`: wires them together.
"""
