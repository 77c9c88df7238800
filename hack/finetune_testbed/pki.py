"""Throw-away PKI for a local control plane: one CA, a serving cert, an admin client
cert, the service-account signing key pair, and the real node's kubelet certificates (its
client identity system:node:<name> and its serving cert). Valid for a week; never reused."""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=7)
# The test bed's one real node (kubelet + containerd): its name and the address it serves
# on, the gateway of its pod bridge (finetune_testbed.realnode).
REAL_NODE_NAME = "real-0"
REAL_NODE_IP = "10.244.0.1"


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path
    node_cert: Path
    node_key: Path
    kubelet_serving_cert: Path
    kubelet_serving_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _sign(subject: x509.Name, key, ca_name: x509.Name, ca_key, *, is_ca: bool,
          usages: list, sans: list | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True,
                                                      False, False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(True, True, False, False, False, False,
                                                      False, False, False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def generate(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_name = _key(), _name("finetune-local-ca")
    ca = _sign(ca_name, ca_key, ca_name, ca_key, is_ca=True, usages=[])
    serving_key = _key()
    serving = _sign(_name("kube-apiserver"), serving_key, ca_name, ca_key, is_ca=False,
                    usages=[ExtendedKeyUsageOID.SERVER_AUTH],
                    sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                          x509.DNSName("localhost"),
                          x509.DNSName("kubernetes.default.svc"),
                          x509.DNSName("kubernetes.default.svc.cluster.local")])
    admin_key = _key()
    admin = _sign(_name("admin", "system:masters"), admin_key, ca_name, ca_key, is_ca=False,
                  usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    # Node authorizer + NodeRestriction identify a kubelet by this name and group.
    node_key = _key()
    node = _sign(_name(f"system:node:{REAL_NODE_NAME}", "system:nodes"), node_key, ca_name,
                 ca_key, is_ca=False, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    kubelet_key = _key()
    kubelet = _sign(_name(REAL_NODE_NAME), kubelet_key, ca_name, ca_key, is_ca=False,
                    usages=[ExtendedKeyUsageOID.SERVER_AUTH],
                    sans=[x509.IPAddress(ipaddress.ip_address(REAL_NODE_IP)),
                          x509.DNSName(REAL_NODE_NAME)])
    sa_key = _key()
    pki = Pki(ca_cert=directory / "ca.crt", serving_cert=directory / "apiserver.crt",
              serving_key=directory / "apiserver.key", admin_cert=directory / "admin.crt",
              admin_key=directory / "admin.key", sa_key=directory / "sa.key",
              sa_pub=directory / "sa.pub", node_cert=directory / "node.crt",
              node_key=directory / "node.key", kubelet_serving_cert=directory / "kubelet.crt",
              kubelet_serving_key=directory / "kubelet.key")
    _write_cert(pki.ca_cert, ca)
    _write_cert(pki.serving_cert, serving)
    _write_key(pki.serving_key, serving_key)
    _write_cert(pki.admin_cert, admin)
    _write_key(pki.admin_key, admin_key)
    _write_key(pki.sa_key, sa_key)
    for cert_path, key_path, cert, key in ((pki.node_cert, pki.node_key, node, node_key),
                                           (pki.kubelet_serving_cert, pki.kubelet_serving_key,
                                            kubelet, kubelet_key)):
        _write_cert(cert_path, cert)
        _write_key(key_path, key)
    pki.sa_pub.write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    # The CA key is deliberately not written: nothing else may mint certs.
    return pki
