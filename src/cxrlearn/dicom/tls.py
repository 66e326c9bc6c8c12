"""DICOM over TLS (PS3.15 Annex B, the BCP 195 profiles) for the node: ``--tls-cert``, ``--tls-key``, ``--tls-ca``.

With a certificate and its key, the node listens for TLS only and sends its results over TLS. With ``--tls-ca``
(the certificates it trusts, PEM), a peer must present a certificate that CA signed, both ways (mutual
authentication, as a hospital's DICOM TLS normally is), and the destination's certificate must also name the host
the node connects to; without it, the node trusts the system's CAs for the destination and asks callers for no
certificate. TLS 1.2 at least.

Everything is checked before the node starts, each failure one line naming the file: a certificate, key or CA file
that is missing or not PEM, a key that does not belong to the certificate, a certificate that has expired or is not
valid yet. A destination whose certificate fails (another CA, expired, another host) is named with OpenSSL's reason
when a send is tried ("certificate verify failed: certificate has expired"), and the results wait in the outbox
as for a destination that is down. Only the standard library's :mod:`ssl` carries the connections; ``cryptography``
reads the certificate's dates.
"""

from __future__ import annotations

import datetime
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from cxrlearn.errors import ConfigError

#: How long a send waits for the destination's TLS handshake, in seconds.
HANDSHAKE_S = 10.0


@dataclass(frozen=True)
class Tls:
    """The node's certificate and key, and the CA its peers' certificates must chain to (None: the system's CAs
    for the destination, and no certificate asked of callers)."""

    cert: Path
    key: Path
    ca: Path | None = None

    @classmethod
    def load(cls, cert: Path | None, key: Path | None, ca: Path | None) -> Tls | None:
        """``--tls-cert/--tls-key/--tls-ca`` checked (the module's description); None when none is given."""
        if cert is None and key is None and ca is None:
            return None
        if cert is None or key is None:
            raise ConfigError("--tls-cert and --tls-key go together (the node's certificate and its private key)")
        tls = cls(Path(cert), Path(key), Path(ca) if ca else None)
        _check_dates(tls.cert, "--tls-cert")
        tls.server_context()  # every file read once, so that a bad one is named now
        return tls

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._configure(context)
        if self.ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's certificate and host name
        self._configure(context)
        if self.ca is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return context

    def _configure(self, context: ssl.SSLContext) -> None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except FileNotFoundError as err:
            raise ConfigError(f"--tls-cert/--tls-key: {err.filename}: no such file") from None
        except ssl.SSLError as err:
            why = ("the key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(err)
                   else f"not a PEM certificate and its key ({err.reason or err})")
            raise ConfigError(f"--tls-cert {self.cert} with --tls-key {self.key}: {why}") from None
        if self.ca is not None:
            try:
                context.load_verify_locations(cafile=self.ca)
            except FileNotFoundError:
                raise ConfigError(f"--tls-ca {self.ca}: no such file") from None
            except ssl.SSLError as err:
                raise ConfigError(f"--tls-ca {self.ca}: not PEM certificates ({err.reason or err})") from None

    def handshake_problem(self, host: str, port: int) -> str | None:
        """Why a TLS connection to ``host:port`` fails (OpenSSL's reason, in one line), or None when it succeeds:
        tried before an association, so that a refused certificate is named rather than lost in a log."""
        try:
            with socket.create_connection((host, port), timeout=HANDSHAKE_S) as raw:
                with self.client_context().wrap_socket(raw, server_hostname=host):
                    return None
        except ssl.SSLCertVerificationError as err:
            return f"TLS with {host}:{port}: certificate verify failed: {err.verify_message}"
        except ssl.SSLError as err:
            return f"TLS with {host}:{port}: {err.reason or err}"
        except OSError as err:
            return f"TLS with {host}:{port}: {err.strerror or err}"


def _check_dates(path: Path, option: str) -> None:
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{option} {path}: no such file") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{option} {path}: not a PEM certificate ({err})") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc < now:
        raise ConfigError(f"{option} {path}: the certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    if certificate.not_valid_before_utc > now:
        raise ConfigError(f"{option} {path}: the certificate is not valid until "
                          f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
