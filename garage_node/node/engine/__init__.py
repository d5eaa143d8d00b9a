"""The inference engine: vLLM's OpenAI-compatible server in a Docker container.

catalog (models.toml) -> planner (what fits the GPUs) -> spec (what should run) -> manager
(Docker reconciled towards it, through the narrow client in docker)."""
