"""fl.deploy.keys and ``bonsai deploy keys``: the certificates and node keys it writes load
in Flower's own loaders, every mismatch or missing file is named before anything starts,
and key material is never destroyed: every file it would write is checked before any is
written; ``--force`` moves the old files into a backup folder."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fl.deploy import (
    KeyFileError,
    check_node_key,
    check_node_tls,
    check_superlink_tls,
    make_keys,
)
from fl.deploy.keys import key_files

ROOT = Path(__file__).resolve().parent.parent


def keys_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl.cli", "deploy", "keys", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """relative path -> (bytes, mtime_ns, mode) of every file below ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def full(tmp_path) -> Path:
    """A keys folder as `bonsai deploy keys --nodes 2` leaves it."""
    out = tmp_path / "keys"
    assert keys_cli("--out", str(out), "--nodes", "2").returncode == 0
    return out


def _one_line_exit_2(proc: subprocess.CompletedProcess, first: Path, count: int) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"bonsai: error: --out: {str(first)!r} already exists ({count} "
                               "of the 8 files")
    assert "--force" in lines[0] and "nothing written" in lines[0]


def test_ca_and_superlink_without_ca_key_are_kept(full):
    """The README says to keep ca.key offline: a SuperLink folder holds ca.crt and
    superlink.* but no ca.key. Today's main replaced them silently (exit 0)."""
    (full / "ca.key").unlink()
    for f in (full / "nodes").iterdir():
        f.unlink()
    (full / "nodes").rmdir()
    before = snapshot(full)
    assert sorted(before) == ["ca.crt", "superlink.crt", "superlink.key"]
    proc = keys_cli("--out", str(full), "--nodes", "2")
    _one_line_exit_2(proc, full / "ca.crt", 3)
    assert snapshot(full) == before  # bytes, mtimes and modes
    assert sorted(p.name for p in full.iterdir()) == ["ca.crt", "superlink.crt", "superlink.key"]


def test_full_folder_without_ca_key_changes_nothing(full):
    """Today's main replaced the CA and SuperLink files, then stopped at node-0."""
    (full / "ca.key").unlink()
    before = snapshot(full)
    assert len(before) == 7
    proc = keys_cli("--out", str(full), "--nodes", "2")
    _one_line_exit_2(proc, full / "ca.crt", 7)
    assert snapshot(full) == before


def test_one_extra_node_key_in_the_way_is_found_before_anything_is_written(tmp_path):
    out = tmp_path / "keys"
    (out / "nodes").mkdir(parents=True)
    (out / "nodes" / "node-1.pub").write_text("an old public key\n")
    before = snapshot(out)
    with pytest.raises(KeyFileError, match=r"node-1\.pub' already exists \(1 of the 8 files"):
        make_keys(out, [], 2)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["nodes"]


def test_force_backs_up_every_replaced_file_byte_identical(full):
    (full / "ca.key").unlink()  # kept offline
    (full / "notes.txt").write_text("not ours\n")
    before = snapshot(full)
    proc = keys_cli("--out", str(full), "--nodes", "2", "--force")
    assert proc.returncode == 0, proc.stderr
    (backup,) = [p for p in full.iterdir() if p.name.startswith("backup-")]
    assert f"moved 7 existing file(s) it replaced to {backup}/" in proc.stdout
    assert oct(backup.stat().st_mode & 0o777) == oct(0o700)
    moved = snapshot(backup)
    assert sorted(moved) == sorted(k for k in before if k != "notes.txt")
    for rel, (data, mtime, mode) in moved.items():
        assert (data, mtime, mode) == before[rel], rel
    # a fresh, consistent set was written; the unrelated file is untouched
    after = snapshot(full)
    assert after["notes.txt"] == before["notes.txt"]
    for f in key_files(full, ["node-0", "node-1"]):
        rel = str(f.relative_to(full))
        assert f.is_file() and after[rel][0] != before.get(rel, (b"",))[0], rel
    assert (full / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (full / "nodes" / "node-0").stat().st_mode & 0o777 == 0o600
    check_superlink_tls(full / "ca.crt", full / "superlink.crt", full / "superlink.key")
    # a second --force in the same second gets its own backup folder
    again = make_keys(full, [], ["node-0", "node-1"], force=True)
    assert again.backup is not None and again.backup != backup and again.backup.parent == full
    assert len(snapshot(again.backup)) == 8 and snapshot(backup) == moved


def test_overwrite_flag_is_gone_and_duplicate_names_refused(tmp_path):
    proc = keys_cli("--out", str(tmp_path / "k"), "--overwrite")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = keys_cli("--out", str(tmp_path / "k"), "--name", "a", "--name", "a")
    assert proc.returncode == 2 and "given more than once" in proc.stderr
    assert not (tmp_path / "k").exists()


def test_a_file_created_between_the_check_and_the_write_is_not_replaced(tmp_path, monkeypatch):
    """Files are created with O_EXCL: a race loses with an error, not with lost bytes."""
    import fl.deploy.keys as K

    out = tmp_path / "k"
    real = K._write

    def racing(path, data, private=False):
        if path.name == "superlink.key":
            path.write_bytes(b"appeared meanwhile")
        real(path, data, private)

    monkeypatch.setattr(K, "_write", racing)
    with pytest.raises(FileExistsError):
        make_keys(out, [], 1)
    assert (out / "superlink.key").read_bytes() == b"appeared meanwhile"
    assert os.path.isfile(out / "ca.key")


# --- keys ------------------------------------------------------------------------------
def test_keys_files_chain_and_flowers_own_loaders(keys):
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(keys.superlink_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)  # self-signed root
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3",
                                                                          "127.0.0.1"}
    for private in (keys.dir / "ca.key", keys.superlink_key, keys.node_key("node-0")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # what flower-supernode and `flwr supernode register` do with the node keys
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(keys.node_pub("node-1"))
    priv = serialization.load_ssh_private_key(keys.node_key("node-1").read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    check_superlink_tls(keys.ca_cert, keys.superlink_cert, keys.superlink_key)
    check_node_tls(keys.ca_cert, "10.1.2.3", keys.superlink_cert)
    check_node_key(keys.node_key("node-0"))


def test_keys_refuse_to_overwrite_and_bad_hosts(keys, tmp_path):
    with pytest.raises(KeyFileError, match="ca.key' already exists"):
        make_keys(keys.dir, [], 1)
    with pytest.raises(KeyFileError, match="--host"):
        make_keys(tmp_path / "k", ["bad host"], 1)


def test_mismatched_and_missing_certificates_are_named(keys, other_keys, tmp_path):
    with pytest.raises(KeyFileError, match="was not issued by the CA"):
        check_superlink_tls(other_keys.ca_cert, keys.superlink_cert, keys.superlink_key)
    with pytest.raises(KeyFileError, match="does not belong to the certificate"):
        check_superlink_tls(keys.ca_cert, keys.superlink_cert, other_keys.superlink_key)
    with pytest.raises(KeyFileError, match="does not exist"):
        check_superlink_tls(tmp_path / "ca.crt", keys.superlink_cert, keys.superlink_key)
    with pytest.raises(KeyFileError, match="not a PEM certificate"):
        check_node_tls(keys.superlink_key)
    with pytest.raises(KeyFileError, match="valid for"):
        check_node_tls(keys.ca_cert, "other.example.org", keys.superlink_cert)
    with pytest.raises(KeyFileError, match="not an OpenSSH private key"):
        check_node_key(keys.superlink_key)
