"""Simulation results must not depend on the process (PYTHONHASHSEED) or differ from live.

Built-in ``hash()`` of a string is salted per process: the simulator's workflow prefix-cache
keys were once derived from it, so they changed from run to run (and never matched the
live dispatcher's keys). These tests pin the keys and every outcome that depends on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

from goodserve.dispatcher.service import DispatcherService
from goodserve.schemas import AgentRequest

from goodserve.sim.fleet import builtin_fleet
from goodserve.sim.kvcache import block_hashes_for_key
from goodserve.sim.simulator import Simulator
from goodserve.sim.synth import synthesize_workflows

# One small closed-loop workflow simulation; prints what must be reproducible.
_SCRIPT = r"""
import hashlib, json, sys
from goodserve.sim.fleet import builtin_fleet
from goodserve.sim.simulator import SimConfig, Simulator
from goodserve.sim.synth import synthesize_workflows

trace = synthesize_workflows(workflows=8, rps=2.0, steps=(2, 4), seed=7, slo_per_step_s=20.0)
cfg = SimConfig(policy="goodserve", predictor=sys.argv[1], seed=3)
sim = Simulator(fleet=builtin_fleet("mixed8"), trace=trace, config=cfg)
rep = sim.run()
hashes = hashlib.sha256()
for row in sim.rows:
    hashes.update(json.dumps(sim._block_hashes(row)).encode())
print(json.dumps({
    "slo_attainment": rep["slo_attainment"],
    "workflow_attainment": rep["workflow_attainment"],
    "prefix_hit_rate": rep["prefix_hit_rate"],
    "placement": {rid: r.instance for rid, r in sorted(sim.records.items())},
    "cached_tokens": {rid: r.cached_tokens for rid, r in sorted(sim.records.items())},
    "prefix_hits": {
        i.instance_id: [i.status().prefix_hit_tokens, i.status().prefix_query_tokens]
        for i in sim.instances
    },
    "block_hashes": hashes.hexdigest(),
}, sort_keys=True))
"""


def _run_in_processes(predictor: str, seeds: tuple[str, ...]) -> list[dict]:
    procs = []
    for seed in seeds:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _SCRIPT, predictor],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_workflow_simulation_identical_across_hash_seeds() -> None:
    a, b = _run_in_processes("oracle", ("1", "2"))
    assert a["block_hashes"] == b["block_hashes"]
    assert a["placement"] == b["placement"]
    assert all(v is not None for v in a["placement"].values())
    assert a["cached_tokens"] == b["cached_tokens"]
    assert a["prefix_hits"] == b["prefix_hits"]
    assert a["slo_attainment"] == b["slo_attainment"]
    assert a["workflow_attainment"] == b["workflow_attainment"]
    assert a["prefix_hit_rate"] == b["prefix_hit_rate"] > 0.0  # the prefix cache was exercised


def test_workflow_prefix_keys_are_the_live_dispatchers() -> None:
    """The simulator keys a workflow's prompt blocks exactly as the live dispatcher does
    for a request with a workflow id, a token count and no prompt text."""
    trace = synthesize_workflows(workflows=3, rps=1.0, steps=(2, 3), seed=1)
    sim = Simulator(fleet=builtin_fleet("mixed8"), trace=trace)
    live = types.SimpleNamespace(router=None)  # no router: the live default block size, 16
    assert sim.instances[0].block_size == 16
    for row in sim.rows:
        assert row.workflow_id is not None and row.prompt is None
        req = AgentRequest(
            request_id="r",
            model=row.model or "default",
            workflow_id=row.workflow_id,
            step=row.step,
            input_tokens=row.input_tokens,
            max_tokens=row.output_tokens,
        )
        want = DispatcherService.block_hashes(live, req)
        assert want == block_hashes_for_key(row.workflow_id, row.input_tokens, 16)
        assert sim._block_hashes(row) == want
