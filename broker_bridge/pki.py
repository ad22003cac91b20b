"""A private certificate authority and a server certificate for the federation's broker.

Why fedline makes its own: the broker must speak TLS from the first start (a
plaintext listener would carry credentials and ciphertext metadata in the
clear), and a plant seldom has a PKI at hand. The CA key signs only the broker's
certificate; sites trust the CA certificate (``ca.crt``, public) and check the
broker's name against it, so a machine in the middle cannot pose as the broker.
An operator with a PKI passes its own files instead (``fedline broker config
--ca-file --cert-file --key-file``) and nothing is generated.

Keys are ECDSA P-256 (small, fast handshakes on gateways), written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker_bridge.errors import FedlineError
from broker_bridge.keys import write_private, write_public

CA_DAYS = 10 * 365
SERVER_DAYS = 2 * 365


@dataclass(frozen=True)
class TlsFiles:
    """The three files a Mosquitto TLS listener needs (the CA's key stays out of it)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedline"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def ensure_broker_tls(pki_dir: str | Path, federation: str, hosts: list[str]) -> TlsFiles:
    """Create (once) a CA and a server certificate valid for ``hosts`` in ``pki_dir``; return the paths.

    Existing files are reused, so re-running ``fedline broker config`` does not
    invalidate the CA every site already trusts. A server certificate that does
    not name every host asked for is re-issued from the same CA.
    """
    if not hosts:
        raise FedlineError("the broker certificate needs at least one host name or address")
    d = Path(pki_dir)
    d.mkdir(parents=True, exist_ok=True)
    ca_crt, ca_key_p, srv_crt, srv_key_p = d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key"
    now = dt.datetime.now(dt.UTC)
    pem = serialization.Encoding.PEM

    def private_pem(k: ec.EllipticCurvePrivateKey) -> str:
        return k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()

    if ca_crt.exists() and ca_key_p.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_p.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise FedlineError(f"{ca_key_p} is not the EC key fedline generates; pass your own CA with --ca-file")
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"fedline {federation} broker CA"))
            .issuer_name(_name(f"fedline {federation} broker CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_private(ca_key_p, private_pem(ca_key))
        write_public(ca_crt, ca_cert.public_bytes(pem).decode())
        srv_crt.unlink(missing_ok=True)  # a new CA: any old server certificate no longer chains to it

    if srv_crt.exists() and srv_key_p.exists() and _names_cover(srv_crt, hosts, ca_cert):
        return TlsFiles(ca_crt, srv_crt, srv_key_p)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(srv_key_p, private_pem(key))
    write_public(srv_crt, cert.public_bytes(pem).decode())
    return TlsFiles(ca_crt, srv_crt, srv_key_p)


def _names_cover(cert_path: Path, hosts: list[str], ca_cert: x509.Certificate) -> bool:
    """Whether the server certificate at ``cert_path`` was issued by ``ca_cert`` and names every host."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.issuer != ca_cert.subject:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    return all(str(ipaddress.ip_address(h)) in have if _is_ip(h) else h in have for h in hosts)


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False
