"""A client certificate for the OPC UA source: ``fedline opcua-cert --out DIR``.

Why: the ``opcua`` source signs and encrypts by default (``security_mode =
"SignAndEncrypt"``), and OPC UA authenticates applications by X.509
certificates. A plant usually has no PKI for its data collectors, so this makes
the self-signed application certificate OPC 10000-6 §6.2.2 describes (URI and
DNS subject alternative names, client-auth extended key use) with asyncua's own
helpers, so what the server is asked to trust is what asyncua itself would
generate. The private key is written with mode 0600 and is never overwritten
by accident (``--force`` replaces both files).

The server's operator must then trust ``client.der`` (copy it into the
server's trusted-certificates folder, or accept it in its UI); pinning the
server's certificate with ``server_certificate`` guards the first connection
against an impostor server.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClientCertificate:
    certificate: Path  # DER
    private_key: Path  # PEM (PKCS#8), mode 0600
    application_uri: str


def default_application_uri(hostname: str | None = None) -> str:
    """``urn:<host>:fedline:opcua-client``: unique per host, as OPC UA asks of application URIs."""
    return f"urn:{hostname or socket.gethostname()}:fedline:opcua-client"


def make_client_certificate(
    out_dir: str | Path,
    *,
    name: str = "client",
    application_uri: str | None = None,
    hostname: str | None = None,
    days: int = 365,
    force: bool = False,
) -> ClientCertificate:
    """Write ``<name>.der`` and ``<name>.pem`` into ``out_dir`` and return their paths.

    Raises ``FileExistsError`` if either file exists and ``force`` is false
    (replacing a key that a server already trusts would lock the source out).
    """
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    host = hostname or socket.gethostname()
    uri = application_uri or default_application_uri(host)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.der", out / f"{name}.pem"
    for p in (cert_path, key_path):
        if p.exists() and not force:
            raise FileExistsError(f"{p} exists (use --force to replace it; the server must then trust the new one)")
    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key,
        uri,
        {"organizationName": "fedline"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName(host)],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(dump_private_key_as_pem(key))
    os.chmod(key_path, 0o600)  # O_CREAT's mode does not apply to a file that already existed (--force)
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    return ClientCertificate(cert_path, key_path, uri)


def application_uri_of(certificate_der_or_pem: bytes) -> str | None:
    """The URI subject alternative name of a certificate: the client must announce the same one."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(certificate_der_or_pem)
    except ValueError:
        cert = x509.load_pem_x509_certificate(certificate_der_or_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


__all__ = ["ClientCertificate", "application_uri_of", "default_application_uri", "make_client_certificate"]
