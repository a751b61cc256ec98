"""RoundRobinRouter: an adapter-blind Ray Serve request router, each request to the next
replica in turn (by replica id), for measuring what adapter routing saves."""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class RoundRobinRouter(RequestRouter):
    """Ray Serve ``RequestRouter``: the candidates sorted by replica id, one per request in
    rotation (a replica that refuses, being at ``max_ongoing_requests``, is retried by Ray
    with the next turn)."""

    def initialize_state(self, **kwargs) -> None:
        self._turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        chosen = ordered[self._turn % len(ordered)]
        self._turn += 1
        return [[chosen]]
