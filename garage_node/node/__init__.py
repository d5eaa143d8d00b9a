"""What runs on a gaming PC: the agent (`garage-node run`), its local API and status, the
GPU inventory, enrollment and heartbeats, the Ray worker and the engine."""
