"""Certificates and node keys for a Flower deployment, made with ``cryptography``.

``make_keys(out, hosts, nodes)`` writes one folder a federation operator keeps
(never over existing key material: every file it would write is checked before
any is written; ``force`` first moves the existing ones into a backup folder):

    ca.crt ca.key                 the certificate authority (keep ca.key offline)
    superlink.crt superlink.key   the SuperLink's TLS certificate (signed by the CA,
                                  valid for ``hosts`` plus localhost/127.0.0.1)
    nodes/NAME                    a SuperNode's authentication private key (OpenSSH,
                                  NIST P-384: what ``flower-supernode
                                  --auth-supernode-private-key`` reads)
    nodes/NAME.pub                its public key (what ``flwr supernode register``
                                  reads)

:func:`check_superlink_tls` and :func:`check_node_tls` check a set of files
before a process is started, so a missing or mismatched file is one clear line
instead of a gRPC handshake failure minutes later.

Why one module of this length: making the key material and checking it are two
halves of one file layout (names, formats, the CA chain, the hosts a certificate
covers); the checks read exactly what :func:`make_keys` writes, so a change to one
shows in the other. It is the only module that imports ``cryptography``.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "KeyFileError",
    "KeySet",
    "add_node_key",
    "backup_existing",
    "cert_hosts",
    "check_node_key",
    "check_node_tls",
    "check_superlink_tls",
    "key_files",
    "make_keys",
    "node_key_paths",
]

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SL_CERT, SL_KEY = "superlink.crt", "superlink.key"
NODES_DIR = "nodes"
#: certificate validity allowed (100 years; datetime overflows near 3 million days)
MAX_DAYS = 36_500
_LOCAL_HOSTS = ("localhost", "127.0.0.1")


class KeyFileError(ValueError):
    """A certificate or key that is missing, unreadable or does not match."""


@dataclass(frozen=True)
class KeySet:
    """Paths of one deployment's certificates and node keys."""

    dir: Path
    nodes: tuple[str, ...]
    #: where ``force`` moved the files it replaced (None when nothing was replaced)
    backup: Path | None = None

    @property
    def ca_cert(self) -> Path:
        return self.dir / CA_CERT

    @property
    def superlink_cert(self) -> Path:
        return self.dir / SL_CERT

    @property
    def superlink_key(self) -> Path:
        return self.dir / SL_KEY

    def node_key(self, name: str) -> Path:
        return self.dir / NODES_DIR / name

    def node_pub(self, name: str) -> Path:
        return self.dir / NODES_DIR / f"{name}.pub"


def node_key_paths(out: str | Path, name: str) -> tuple[Path, Path]:
    """(private key, public key) of SuperNode ``name`` inside a keys folder."""
    d = Path(out) / NODES_DIR
    return d / name, d / f"{name}.pub"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Create ``path`` (O_EXCL: a file that appeared since the check is never replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def key_files(out: str | Path, names: Sequence[str]) -> list[Path]:
    """Every file :func:`make_keys` writes into ``out`` for node keys ``names``."""
    out = Path(out)
    files = [out / CA_KEY, out / CA_CERT, out / SL_KEY, out / SL_CERT]
    for n in names:
        files.extend(node_key_paths(out, n))
    return files


def _existing(paths: Sequence[Path]) -> list[Path]:
    return [p for p in paths if os.path.lexists(p)]  # a dangling link counts: it is in the way


def _refuse_existing(paths: Sequence[Path]) -> None:
    found = _existing(paths)
    if found:
        raise KeyFileError(
            f"--out: {str(found[0])!r} already exists ({len(found)} of the {len(paths)} files "
            "to write exist); nothing written: choose another folder, or pass --force to move "
            "the existing files into a backup folder first")


def backup_existing(out: str | Path, paths: Sequence[Path]) -> Path | None:
    """Move those of ``paths`` that exist (all inside ``out``) into a new
    ``out/backup-YYYYmmdd-HHMMSS[-N]/`` folder (private, relative paths kept); return
    it, or None when none exists."""
    out = Path(out)
    found = _existing(paths)
    if not found:
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    backup, i = out / f"backup-{stamp}", 0
    while os.path.lexists(backup):
        i += 1
        backup = out / f"backup-{stamp}-{i}"
    backup.mkdir(mode=0o700)
    for p in found:
        dest = backup / p.relative_to(out)
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.move(p, dest)  # a rename inside ``out``: bytes, modes and times kept
    return backup


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, *_LOCAL_HOSTS]):  # ordered, unique
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bonsai"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _check_hosts(hosts: Sequence[str]) -> None:
    for h in hosts:
        if not h or any(c.isspace() for c in h) or ":" in h and not _is_ip(h):
            raise KeyFileError(f"--host: {h!r} is not a host name or IP address")


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def make_keys(out: str | Path, hosts: Sequence[str] = (), nodes: int | Sequence[str] = 2,
              days: int = 365, force: bool = False) -> KeySet:
    """Create a CA, a SuperLink certificate for ``hosts`` and one key pair per SuperNode.

    Every file it would write (:func:`key_files`) is checked before any is written:
    when one exists, nothing is written (a KeyFileError names the first), unless
    ``force``, which first moves the existing ones into a backup folder
    (:func:`backup_existing`, returned as ``KeySet.backup``). Key material is never
    overwritten.

    Parameters
    ----------
    out:
        Folder to write (created).
    hosts:
        Names and IP addresses the SuperLink is reached at (localhost and
        127.0.0.1 are always added).
    nodes:
        A number ``n`` (keys ``node-0 .. node-{n-1}``) or explicit names.
    days:
        Validity of the certificates.
    force:
        Back up and replace existing files instead of refusing.

    Raises
    ------
    KeyFileError
        When a file to write exists (and not ``force``) or an argument is malformed.
    """
    out = Path(out)
    names = tuple(f"node-{i}" for i in range(nodes)) if isinstance(nodes, int) else tuple(nodes)
    if isinstance(nodes, int) and nodes < 0:
        raise KeyFileError(f"--nodes: got {nodes}; allowed: >= 0")
    for n in names:
        if not n or "/" in n or n.startswith("."):
            raise KeyFileError(f"--name: {n!r} is not a valid key name")
    _check_hosts(hosts)
    if not 1 <= days <= MAX_DAYS:
        raise KeyFileError(f"--days: got {days}; allowed: 1..{MAX_DAYS}")
    if len(set(names)) != len(names):
        raise KeyFileError(f"--name: {sorted({n for n in names if names.count(n) > 1})} given "
                           "more than once")
    files = key_files(out, names)
    if not force:
        _refuse_existing(files)
    now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("Bonsai CA")).issuer_name(_name("Bonsai CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    sl_key = ec.generate_private_key(ec.SECP384R1())
    sl_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_cert.subject).public_key(sl_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    backup = backup_existing(out, files) if force else None
    _write(out / CA_KEY, _pem_key(ca_key), private=True)
    _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / SL_KEY, _pem_key(sl_key), private=True)
    _write(out / SL_CERT, sl_cert.public_bytes(serialization.Encoding.PEM))
    for n in names:
        add_node_key(out, n)
    return KeySet(out, names, backup)


def add_node_key(out: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write one SuperNode key pair (OpenSSH, NIST P-384) into ``out/nodes``; refuses
    (nothing written) when either file exists, unless ``force`` (backs them up first)."""
    priv_path, pub_path = node_key_paths(out, name)
    if force:
        backup_existing(out, [priv_path, pub_path])
    else:
        _refuse_existing([priv_path, pub_path])
    key = ec.generate_private_key(ec.SECP384R1())
    _write(priv_path, key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()), private=True)
    _write(pub_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH)
           + f" {name}\n".encode())
    return priv_path, pub_path


# --- checks ----------------------------------------------------------------------
def _read(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"{what}: {str(p)!r} does not exist (create it with "
                           "`bonsai deploy keys`)")
    return p.read_bytes()


def _cert(path: str | Path, what: str) -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise KeyFileError(f"{what}: {str(path)!r} is not a PEM certificate") from None


def _verify_signed_by(cert: x509.Certificate, ca: x509.Certificate, what: str,
                      path: str | Path, ca_path: str | Path) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KeyFileError(f"{what}: {str(path)!r} was not issued by the CA {str(ca_path)!r} "
                        "(certificates from different `bonsai deploy keys` runs?)") from None
    now = _dt.datetime.now(_dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KeyFileError(f"{what}: {str(path)!r} is not valid now (valid "
                           f"{cert.not_valid_before_utc:%Y-%m-%d} .. "
                           f"{cert.not_valid_after_utc:%Y-%m-%d})")


def cert_hosts(cert_path: str | Path) -> list[str]:
    """The host names and IPs a certificate is valid for."""
    cert = _cert(cert_path, "--ssl-certfile")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def check_superlink_tls(ca_cert: str | Path, certfile: str | Path, keyfile: str | Path) -> None:
    """The SuperLink's three TLS files exist, parse, chain to the CA and match each other."""
    ca = _cert(ca_cert, "--ssl-ca-certfile")
    cert = _cert(certfile, "--ssl-certfile")
    _verify_signed_by(cert, ca, "--ssl-certfile", certfile, ca_cert)
    data = _read(keyfile, "--ssl-keyfile")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"--ssl-keyfile: {str(keyfile)!r} is not an unencrypted PEM private "
                        "key") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise KeyFileError(f"--ssl-keyfile: {str(keyfile)!r} does not belong to the certificate "
                        f"{str(certfile)!r}")


def check_node_tls(root_cert: str | Path, superlink_host: str | None = None,
                   superlink_cert: str | Path | None = None) -> None:
    """A SuperNode's CA file parses; with the SuperLink's certificate at hand, it chains
    to it and covers ``superlink_host``."""
    ca = _cert(root_cert, "--root-certificates")
    if superlink_cert is not None:
        cert = _cert(superlink_cert, "--ssl-certfile")
        _verify_signed_by(cert, ca, "--root-certificates", superlink_cert, root_cert)
        hosts = cert_hosts(superlink_cert)
        if superlink_host and superlink_host not in hosts:
            raise KeyFileError(f"--superlink: the SuperLink certificate is valid for {hosts}, not "
                            f"{superlink_host!r} (recreate it with --host {superlink_host})")


def check_node_key(private_key: str | Path) -> None:
    """A SuperNode authentication key: an OpenSSH NIST-curve EC private key."""
    data = _read(private_key, "--auth-key")
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"--auth-key: {str(private_key)!r} is not an OpenSSH private key "
                        "(create one with `bonsai deploy keys`)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"--auth-key: {str(private_key)!r} is not an EC key; Flower needs a "
                        "NIST-curve (P-256/P-384/P-521) key")
