"""Pure helpers of the Apache Kafka launcher: no JVM needed."""

from __future__ import annotations

import base64

from goodserve.broker.apache import new_cluster_id


def test_cluster_ids_never_look_like_an_option() -> None:
    # One id in 64 began with '-' and Kafka's StorageTool read it as a flag (a CI failure).
    ids = [new_cluster_id() for _ in range(5000)]
    assert all(not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)
    for i in ids[:50]:
        assert len(base64.urlsafe_b64decode(i + "==")) == 16
