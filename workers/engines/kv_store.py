"""A KV connector for migration: vLLM's ExampleConnector, driven per request.

vLLM's ``ExampleConnector`` writes the KV of *every* new request's prompt to a shared
directory and loads it for *any* later request whose prompt matches. For migration we want
both to be explicit, so the ``kv_ref`` of a request decides:

* store only for requests whose ``kv_transfer_params`` carry ``{"goodserve_export": true}``
  (the source engine's checkpoint export), not for ordinary traffic (no disk writes on the
  hot path);
* load only for requests carrying ``{"goodserve_load": true}`` (a resumed request with a
  kv_ref); a request without one recomputes its context by prefill, as documented.

It also uses one key length for lookup, store and load (all but the last token, rounded down
to whole blocks), where the example looks one block shorter than it stores whenever
``len(prompt) - 1`` is a multiple of the block size.

This module imports vLLM at import time: vLLM loads it by ``kv_connector_module_path`` in
its own processes; nothing else in GoodServe imports it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
    ExampleConnector,
    ExampleConnectorMetadata,
)

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

EXPORT_KEY = "goodserve_export"
LOAD_KEY = "goodserve_load"


def kv_key_tokens(n_tokens: int, block_size: int) -> int:
    """Tokens whose KV is stored/loaded for a prompt of ``n_tokens`` (whole blocks, < n)."""
    return max(0, (n_tokens - 1) // block_size * block_size)


def _flag(request: Request, key: str) -> bool:
    params: Any = getattr(request, "kv_transfer_params", None)
    return bool(params) and bool(params.get(key))


class GoodServeKVConnector(ExampleConnector):
    """ExampleConnector that stores on export and loads on resume only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._export_ids: set[str] = set()

    # -- scheduler side -------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if _flag(request, EXPORT_KEY):
            self._export_ids.add(request.request_id)
        if not _flag(request, LOAD_KEY):
            return 0, False
        token_ids = list(request.prompt_token_ids or [])
        n = kv_key_tokens(len(token_ids), self._block_size)
        if n <= num_computed_tokens or not self._stored(token_ids[:n], request):
            return 0, False
        return n - num_computed_tokens, False

    def _stored(self, key_tokens: list[int], request: Request) -> bool:
        folder = self._generate_foldername_debug(
            torch.tensor(key_tokens),
            [f.identifier for f in request.mm_features],
            create_folder=False,
        )
        return os.path.isdir(folder)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        meta = ExampleConnectorMetadata()
        for new_req in scheduler_output.scheduled_new_reqs:
            token_ids = list(new_req.prompt_token_ids or [])
            mm_hashes = [f.identifier for f in new_req.mm_features]
            if new_req.req_id in self._requests_need_load:
                load = True
            elif new_req.req_id in self._export_ids:
                load = False
            else:
                continue
            meta.add_request(
                token_ids=token_ids,
                block_ids=new_req.block_ids[0],
                block_size=self._block_size,
                is_store=not load,
                mm_hashes=mm_hashes,
            )
            self._export_ids.discard(new_req.req_id)
        # Resumed-after-preemption requests that still need a load (as in the example).
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in cached.resumed_req_ids or req_id not in self._requests_need_load:
                continue
            request = self._requests_need_load[req_id]
            total = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id]
            new_block_ids = cached.new_block_ids[i]
            assert new_block_ids is not None
            meta.add_request(
                token_ids=list(request.all_token_ids[:total]),
                block_ids=new_block_ids[0],
                block_size=self._block_size,
                is_store=False,
                mm_hashes=[f.identifier for f in request.mm_features],
            )
        self._requests_need_load.clear()
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Any]:
        self._export_ids.discard(request.request_id)
        return super().request_finished(request, block_ids)
