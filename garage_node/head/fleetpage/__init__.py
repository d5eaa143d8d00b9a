"""The operator's fleet page: a read-only web view of the region, served by `garage-node head
run` on a listener of its own (`[fleet]` in the head config)."""

from garage_node.head.fleetpage.app import create_fleet_app
from garage_node.head.fleetpage.history import History

__all__ = ["History", "create_fleet_app"]
