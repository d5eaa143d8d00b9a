"""The nodes a Ray head's GCS knows, as JSON, read in a child process (ray stays out of the
head's own memory):

    python -m garage_node.head.rayprobe IP:PORT              one answer, then exit
    python -m garage_node.head.rayprobe --watch S IP:PORT    one line every S seconds, for good

It talks to the GCS directly (ray._raylet.GcsClient) instead of `ray.init()`: no driver is
registered and nothing is left behind in the cluster. `--watch` is what the head runs: one
long-lived process, where starting a Python that imports Ray every 2 s cost 16-22 % of a core.
A watch line is {"cluster_id": HEX, "nodes": [...]}: the id of the Ray cluster is the one this
client joined, and the GCS answers a client only within that cluster (a Ray head that came back
as a new cluster refuses it with WrongClusterID), so the nodes and the id always belong together.
A failed query prints {"error": ...} (the head then treats no node as alive rather than keep an
old answer); after a run of failures the watch exits and the head starts a new one, which also
reconnects to a restarted Ray head, and learns the new cluster's id.
"""

from __future__ import annotations

import json
import sys
import time

GIVE_UP_AFTER = 5  # failed queries in a row


def nodes(client) -> list[dict]:
    out = []
    for info in client.get_all_node_info(timeout=10).values():
        out.append({
            "ray_node_id": info.node_id.hex(),
            "address": info.node_manager_address,
            "alive": info.state == 0,  # GcsNodeInfo.ALIVE
            "is_head": bool(info.is_head_node),
            "labels": {k: v for k, v in info.labels.items() if not k.startswith("ray.io/")},
            "resources": dict(info.resources_total),
        })
    return out


def cluster_id(client) -> str:
    """The Ray cluster's id as hex, "" if the client has none yet."""
    cid = client.cluster_id
    return "" if cid is None or cid.is_nil() else cid.hex()


def answer(client) -> dict:
    nodes_now = nodes(client)  # first: a client that got an answer knows its cluster's id
    return {"cluster_id": cluster_id(client), "nodes": nodes_now}


def once(address: str) -> int:
    from ray._raylet import GcsClient  # heavy; only in this child

    json.dump(nodes(GcsClient(address=address)), sys.stdout)
    return 0


def watch(address: str, every_s: float) -> int:
    from ray._raylet import GcsClient

    client = GcsClient(address=address)
    failures = 0
    while True:
        try:
            line = json.dumps(answer(client))
            failures = 0
        except Exception as e:  # the Ray head is starting, restarting or gone
            failures += 1
            line = json.dumps({"error": (str(e) or type(e).__name__).splitlines()[0][:200]})
        try:
            print(line, flush=True)
        except BrokenPipeError:  # the head went away
            return 0
        if failures >= GIVE_UP_AFTER:
            return 1
        time.sleep(every_s)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--watch"]:
        return watch(argv[2], float(argv[1]))
    return once(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
