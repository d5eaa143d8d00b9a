"""Print, as JSON, the nodes a Ray head's GCS knows. Run as a child: `python -m garage_node.head.rayprobe IP:PORT`.

It talks to the GCS directly (ray._raylet.GcsClient) instead of `ray.init()`: no driver is
registered, so a probe costs about a second and leaves nothing behind in the cluster.
"""

from __future__ import annotations

import json
import sys


def main(address: str) -> int:
    from ray._raylet import GcsClient  # heavy; only in this child

    client = GcsClient(address=address)
    nodes = []
    for info in client.get_all_node_info(timeout=10).values():
        nodes.append({
            "ray_node_id": info.node_id.hex(),
            "address": info.node_manager_address,
            "alive": info.state == 0,  # GcsNodeInfo.ALIVE
            "is_head": bool(info.is_head_node),
            "labels": {k: v for k, v in info.labels.items() if not k.startswith("ray.io/")},
            "resources": dict(info.resources_total),
        })
    json.dump(nodes, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
