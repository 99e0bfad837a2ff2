"""Fleet files: shapes, count expansion, errors, built-in fleets."""

from __future__ import annotations

from pathlib import Path

import pytest

from goodserve.errors import ConfigError
from goodserve.sim.fleet import (
    BUILTIN_FLEETS,
    Fleet,
    FleetInstance,
    builtin_fleet,
    builtin_fleet_path,
    load_fleet,
    parse_fleet,
)

REPO = Path(__file__).resolve().parent.parent


def _load(tmp_path: Path, text: str) -> Fleet:
    p = tmp_path / "fleet.yaml"
    p.write_text(text)
    return load_fleet(p)


def test_list_form(tmp_path: Path) -> None:
    f = _load(tmp_path, "- {id: fast, gpu: H100}\n- {id: slow, gpu: V100, speed_factor: 0.5}\n")
    assert f == Fleet(
        instances=[
            FleetInstance(id="fast", gpu="H100"),
            FleetInstance(id="slow", gpu="V100", speed_factor=0.5),
        ]
    )
    assert f.model == "llama-2-7b"


def test_mapping_form_with_all_fields(tmp_path: Path) -> None:
    f = _load(
        tmp_path,
        """
model: llama-2-13b
instances:
  - id: remote
    gpu: A100
    model: qwen2.5-7b
    endpoint: http://10.0.0.5:8000
    max_batch: 64
  - {gpu: A40, count: 2}
""",
    )
    assert f.model == "llama-2-13b"
    assert f.instances[0] == FleetInstance(
        id="remote", gpu="A100", model="qwen2.5-7b", endpoint="http://10.0.0.5:8000", max_batch=64
    )
    assert [i.id for i in f.instances] == ["remote", "a40-0", "a40-1"]
    assert f.model_of(f.instances[0]) == "qwen2.5-7b"
    assert f.model_of(f.instances[1]) == "llama-2-13b"
    assert f.get("a40-1").gpu == "A40"


@pytest.mark.parametrize(
    ("entries", "ids"),
    [
        ([{"gpu": "A40", "count": 3}], ["a40-0", "a40-1", "a40-2"]),
        ([{"gpu": "A40", "count": 1}, {"gpu": "A40", "count": 2}], ["a40-0", "a40-1", "a40-2"]),
        ([{"id": "a40-0", "gpu": "A40"}, {"gpu": "A40", "count": 2}], ["a40-0", "a40-1", "a40-2"]),
        ([{"gpu": "A40", "count": 2}, {"id": "a40-1", "gpu": "V100"}], ["a40-0", "a40-2", "a40-1"]),
        ([{"gpu": "H100", "count": 2, "id_prefix": "Fast Pool"}], ["fast-pool-0", "fast-pool-1"]),
        (
            [{"gpu": "A100-80GB", "count": 1}, {"gpu": "H100", "count": 1}],
            ["a100-80gb-0", "h100-0"],
        ),
    ],
)
def test_count_expansion(entries: list[dict[str, object]], ids: list[str]) -> None:
    f = parse_fleet(entries)
    assert [i.id for i in f.instances] == ids
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("- {id: a, gpu: A40, colour: red}\n", "unknown key(s) colour"),
        ("- {id: a}\n", "missing gpu"),
        ("- {id: a, gpu: A40}\n- {id: a, gpu: V100}\n", "duplicate id 'a'"),
        ("- {gpu: A40}\n", "exactly one of id or count"),
        ("- {id: a, count: 2, gpu: A40}\n", "exactly one of id or count"),
        ("- {count: 0, gpu: A40}\n", "count must be an integer >= 1"),
        ("- {count: two, gpu: A40}\n", "count must be an integer >= 1"),
        ("- {id: a, gpu: A40, speed_factor: 0}\n", "speed_factor"),
        ("- {id: a, gpu: A40, max_batch: -1}\n", "max_batch"),
        ("- {count: 2, gpu: A40, endpoint: 'http://x:8000'}\n", "endpoint"),
        ("- {id: a, id_prefix: p, gpu: A40}\n", "id_prefix"),
        ("fleet: []\n", "unknown top-level key(s) fleet"),
        ("instances: []\n", "non-empty list"),
        ("- just-a-string\n", "expected a mapping"),
        ("- {id: a, gpu: [A40\n", "invalid YAML"),
        ("- {id: a, gpu: Z9000}\n", "unknown gpu 'Z9000'"),
        ("- {id: 'node1:gpu0', gpu: A40}\n", "names the instance's topic"),
    ],
)
def test_errors(tmp_path: Path, text: str, needle: str) -> None:
    if needle.startswith("unknown gpu"):
        pytest.importorskip("goodserve.perf.catalogue")
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, text)
    assert needle in str(ei.value)


def test_errors_name_the_entry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fleet\.yaml: instance 1: missing gpu"):
        _load(tmp_path, "- {id: a, gpu: A40}\n- {id: b}\n")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such fleet file"):
        load_fleet("/nonexistent/fleet.yaml")


@pytest.mark.parametrize(
    ("name", "gpus"),
    [
        ("figure2", ["V100", "A40", "A800", "H800"]),
        ("mixed8", ["H100", "H100", "A100", "A100", "A40", "A40", "L40S", "V100"]),
        ("demo", ["H100", "A100", "A40", "A40", "V100"]),
    ],
)
def test_builtin_fleets(name: str, gpus: list[str]) -> None:
    f = builtin_fleet(name)
    assert [i.gpu for i in f.instances] == gpus
    assert len({i.id for i in f.instances}) == len(gpus)
    assert all(i.endpoint is None for i in f.instances)  # all simulated
    assert load_fleet(name) == f  # a bare built-in name works as a path
    example = REPO / "examples" / "fleets" / f"{name}.yaml"
    assert load_fleet(example) == f
    assert example.resolve() == builtin_fleet_path(name).resolve()  # one source of truth


def test_unknown_builtin() -> None:
    with pytest.raises(ConfigError, match="unknown built-in fleet"):
        builtin_fleet("nope")
    assert set(BUILTIN_FLEETS) == {"figure2", "mixed8", "demo"}
