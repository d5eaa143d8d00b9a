"""The inference engine: vLLM's OpenAI-compatible server in a Docker container.

catalog and planner (garage_node.placement: what fits the GPUs) -> spec (what should run) -> manager
(Docker reconciled towards it, through the narrow client in docker)."""
