"""A SCRAM + TLS Apache Kafka for security tests: a self-signed CA, a server certificate and
a SCRAM user created when the storage is formatted (no plaintext client listener is used)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from goodserve.broker.apache import ApacheKafkaBroker, Listener
from goodserve.config import Settings


@dataclass(frozen=True)
class TlsFiles:
    ca_pem: Path
    server_pem: Path
    """Server certificate chain and its (unencrypted PKCS#8) key, one PEM file."""


def make_tls(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A CA and a server certificate for ``host`` (IP and localhost SANs), valid one day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "goodserve-test-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    server = directory / "server.pem"
    server.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(pem) + ca.public_bytes(pem)
    )
    server.chmod(0o600)
    return TlsFiles(ca_pem=ca_path, server_pem=server)


def secure_broker_kwargs(tls: TlsFiles, *, username: str, password: str,
                         mechanism: str = "SCRAM-SHA-256") -> dict[str, object]:
    """ApacheKafkaBroker arguments: a SASL_SSL listener named SECURE with SCRAM users."""
    return {
        "extra_listeners": [Listener("SECURE", "SASL_SSL")],
        "extra_config": {
            "sasl.enabled.mechanisms": mechanism,
            f"listener.name.secure.{mechanism.lower()}.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.secure.ssl.keystore.type": "PEM",
            "listener.name.secure.ssl.keystore.location": str(tls.server_pem),
        },
        "format_args": ["--add-scram", f"{mechanism}=[name={username},password={password}]"],
    }


def secure_settings(broker: ApacheKafkaBroker, tls: TlsFiles, *, username: str, password: str,
                    topic_prefix: str, mechanism: str = "SCRAM-SHA-256") -> Settings:
    return Settings(
        bootstrap_servers=broker.listener_address("SECURE"), topic_prefix=topic_prefix,
        partitions=2, security_protocol="SASL_SSL", sasl_mechanism=mechanism,  # type: ignore[arg-type]
        sasl_username=username, sasl_password=password, ssl_cafile=str(tls.ca_pem),
    )
