#!/usr/bin/env python
"""Time the estimator's first heartbeat rounds of a fleet of one GPU (prints JSON).

The first TPOT observations of each instance set the prior of its unmeasured peers
(``FleetEstimator._learned_tpot``); this measures what a round of heartbeats costs while
they do. Usage: scripts/bench-fleet-warmup.py [--instances 2048] [--busy 0.5] [--rounds 14]
"""

from __future__ import annotations

import argparse
import json
import time

from goodserve.dispatcher.estimator import FleetEstimator
from goodserve.schemas import Heartbeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=2048)
    ap.add_argument("--busy", type=float, default=0.5, help="share of instances running")
    ap.add_argument("--rounds", type=int, default=14)
    args = ap.parse_args()
    n = args.instances
    est = FleetEstimator()
    rounds = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for k in range(n):
            running = 4 if k < args.busy * n else 0
            tpot = 0.02 * (1 + 0.05 * ((k * 7 + r) % 5)) if running else 0.0
            est.on_heartbeat(
                Heartbeat(instance_id=f"i{k}", gpu="H100", model="llama-3-8b", engine="bench",
                          at=float(r), running=running, max_batch=256, tpot_s=tpot,
                          kv_total_blocks=1000, kv_used_blocks=10),
                now=float(r),
            )
        rounds.append(round(time.perf_counter() - t0, 4))
    print(json.dumps({"instances": n, "busy": args.busy, "round_s": rounds,
                      "total_s": round(sum(rounds), 3)}))


if __name__ == "__main__":
    main()
