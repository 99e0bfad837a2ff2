"""Settings: defaults < environment < flags/overrides, validation, redaction, client kwargs."""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from goodserve.config import Settings
from goodserve.errors import ConfigError
from goodserve.transport import TypedConsumer, TypedProducer, kafka_client_kwargs, ssl_context


def test_defaults() -> None:
    s = Settings()
    assert s.bootstrap_servers == "localhost:9092"
    assert s.idempotent_producer and s.acks == "all"
    assert s.security_protocol == "PLAINTEXT"
    assert s.requests_topic == "goodserve.requests"
    assert s.instance_topic("h100-0") == "goodserve.instance.h100-0"
    assert s.dead_letters_topic == "goodserve.deadletters"


def test_env_then_overrides() -> None:
    env = {
        "GOODSERVE_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
        "GOODSERVE_TOPIC_PREFIX": "prod",
        "GOODSERVE_PARTITIONS": "12",
        "GOODSERVE_IDEMPOTENT_PRODUCER": "false",
        "UNRELATED": "x",
    }
    s = Settings.from_env(env)
    assert s.bootstrap_servers == "k1:9092,k2:9092"
    assert s.partitions == 12 and not s.idempotent_producer
    assert s.results_topic == "prod.results"
    o = Settings.from_env(env, topic_prefix="stage", partitions=None)
    assert o.topic_prefix == "stage" and o.partitions == 12  # None means "not given"


def test_flags_override_env_but_never_carry_passwords() -> None:
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    args = parser.parse_args(
        ["--bootstrap-servers", "flag:1", "--no-idempotence", "--partitions", "3"]
    )
    args.sasl_password = "from-a-flag"  # even if someone adds such a flag, it is ignored
    s = Settings.from_args(args)
    assert s.bootstrap_servers == "flag:1" and s.partitions == 3 and not s.idempotent_producer
    assert s.sasl_password is None


@pytest.mark.parametrize(
    "env",
    [
        {"GOODSERVE_PARTITIONS": "many"},
        {"GOODSERVE_PARTITIONS": "0"},
        {"GOODSERVE_ACKS": "2"},
        {"GOODSERVE_SECURITY_PROTOCOL": "KERBEROS"},
        {"GOODSERVE_BOOTSTRAP_SERVERS": "  "},
    ],
)
def test_invalid_values_raise_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as ei:
        Settings.from_env(env)
    assert not ei.value.retriable


@pytest.mark.parametrize("proto", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_sasl_needs_mechanism_user_and_password(proto: str) -> None:
    with pytest.raises(ConfigError):
        Settings(security_protocol=proto)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Settings(security_protocol=proto, sasl_mechanism="PLAIN", sasl_username="u")  # type: ignore[arg-type]
    s = Settings(
        security_protocol=proto,  # type: ignore[arg-type]
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password="p",
    )
    assert s.sasl_mechanism == "SCRAM-SHA-512"


def test_redacted_hides_the_password() -> None:
    s = Settings.from_env(
        {
            "GOODSERVE_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "GOODSERVE_SASL_MECHANISM": "PLAIN",
            "GOODSERVE_SASL_USERNAME": "alice",
            "GOODSERVE_SASL_PASSWORD": "s3cr3t-value",
        }
    )
    r = s.redacted()
    assert r["sasl_password"] == "***" and r["sasl_username"] == "alice"
    assert "s3cr3t-value" not in json.dumps(r)
    assert Settings().redacted()["sasl_password"] is None


def test_client_kwargs_plaintext() -> None:
    kw = kafka_client_kwargs(Settings(bootstrap_servers="a:1, b:2"), role="consumer")
    assert kw["bootstrap_servers"] == ["a:1", "b:2"]
    assert kw["security_protocol"] == "PLAINTEXT"
    assert kw["client_id"] == "goodserve-consumer"
    assert "ssl_context" not in kw and "sasl_plain_password" not in kw


def test_client_kwargs_sasl() -> None:
    s = Settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="bob",
        sasl_password="pw",
    )
    for role in ("producer", "consumer", "admin"):
        kw = kafka_client_kwargs(s, role=role)  # type: ignore[arg-type]
        assert kw["sasl_mechanism"] == "SCRAM-SHA-256"
        assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("bob", "pw")
        assert "ssl_context" not in kw


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make a test certificate")
    d: Path = tmp_path_factory.mktemp("tls")
    key, cert = d / "client.key", d / "client.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=goodserve-test", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return {"cafile": str(cert), "certfile": str(cert), "keyfile": str(key)}


def test_client_kwargs_sasl_ssl_builds_a_tls_context(tls_files: dict[str, str]) -> None:
    s = Settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="p",
        ssl_cafile=tls_files["cafile"],
        ssl_certfile=tls_files["certfile"],
        ssl_keyfile=tls_files["keyfile"],
        ssl_check_hostname=False,
    )
    kw = kafka_client_kwargs(s, role="admin")
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_plain_password"] == "p"


def test_ssl_errors_are_config_errors(tmp_path: Path, tls_files: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        ssl_context(Settings(security_protocol="SSL", ssl_cafile=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError):  # cert without key
        ssl_context(Settings(security_protocol="SSL", ssl_certfile=tls_files["certfile"]))
    assert ssl_context(Settings()) is None
    assert isinstance(ssl_context(Settings(security_protocol="SSL")), ssl.SSLContext)


def test_clients_build_without_io_from_secure_settings(tls_files: dict[str, str]) -> None:
    """Constructors validate and map settings at once but connect only in start()."""
    s = Settings(
        bootstrap_servers="nowhere.invalid:9093",
        security_protocol="SSL",
        ssl_cafile=tls_files["cafile"],
    )
    TypedProducer(settings=s)
    TypedConsumer(settings=s, topics=["t"], group_id="g", service="svc")
