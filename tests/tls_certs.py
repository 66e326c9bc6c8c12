"""Certificates made in a test (cryptography): a CA, and leaf certificates it signs for 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(folder: Path, stem: str, key, certificate) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Authority:
    """A CA in ``folder`` (``<name>.crt``) that issues certificates for the loopback host."""

    def __init__(self, folder: Path, name: str = "test-ca"):
        self.folder, self.key = folder, ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                            .not_valid_before(now - datetime.timedelta(days=1))
                            .not_valid_after(now + datetime.timedelta(days=2))
                            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                            .sign(self.key, hashes.SHA256()))
        self.path = _write(folder, name, self.key, self.certificate)[0]

    def issue(self, stem: str, days: float = 1.0, host: str = "127.0.0.1") -> tuple[Path, Path]:
        """``(certificate, key)`` for ``host``, valid for ``days`` from a day ago (negative: expired)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(self.certificate.subject)
                       .public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(days=2))
                       .not_valid_after(now + datetime.timedelta(days=days))
                       .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                                   x509.DNSName("localhost")]), critical=False)
                       .sign(self.key, hashes.SHA256()))
        return _write(self.folder, stem, key, certificate)
