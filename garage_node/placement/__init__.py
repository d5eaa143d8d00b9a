"""Which model a PC serves, shared by the head (placement) and the agent (its own plan).

catalog (models.toml) -> fit (what fits a PC's GPUs, and the engine arguments) -> decide (the
head's choice for every PC of a region). Pure code: it imports nothing of garage_node.node or
garage_node.head, so both sides run the same arithmetic and a plan made at the head is the plan
the PC would make."""
