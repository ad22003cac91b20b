"""Key files and the enrollment file: round trips, and every bad file refused naming the file."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from broker_bridge.errors import KeyFileError
from broker_bridge.keys import Enrollment, KeyPair, PublicKeys


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_key_pair_round_trips_with_mode_0600(tmp_path: Path) -> None:
    kp = KeyPair.generate("site", "site-a")
    path = tmp_path / "keys" / "site-a.key"
    kp.save(path)
    assert _mode(path) == 0o600
    back = KeyPair.load(path)
    assert (back.ident, back.role) == ("site-a", "site")
    assert bytes(back.signing_key) == bytes(kp.signing_key)
    assert bytes(back.box_key) == bytes(kp.box_key)
    assert back.public() == kp.public()


def test_public_keys_and_enrollment_round_trip(tmp_path: Path) -> None:
    agg = KeyPair.generate("aggregator", "aggregator")
    sites = [KeyPair.generate("site", s) for s in ("site-a", "site-b")]
    sites[0].public().save(tmp_path / "a.pub")
    assert PublicKeys.load(tmp_path / "a.pub") == sites[0].public()
    enr = Enrollment("test", agg.public())
    for s in sites:
        enr.add(s.public())
    enr.save(tmp_path / "enrollment.json")
    back = Enrollment.load(tmp_path / "enrollment.json")
    assert back.aggregator == agg.public()
    assert back.sites == {s.ident: s.public() for s in sites}
    back.revoke("site-a")
    assert list(back.sites) == ["site-b"]
    with pytest.raises(ValueError):
        back.add(agg.public())  # an aggregator key is not a site


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "site-a.key"
    KeyPair.generate("site", "site-a").save(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="too open") as info:
        KeyPair.load(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


def _rewrite(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o600)


@pytest.mark.parametrize(
    "field, raw_len", [("sign_seed", 31), ("sign_seed", 64), ("box_secret", 16), ("box_secret", 0)]
)
def test_wrong_key_length_is_refused(tmp_path: Path, field: str, raw_len: int) -> None:
    path = tmp_path / "k.key"
    KeyPair.generate("site", "site-a").save(path)
    _rewrite(path, **{field: base64.b64encode(b"\x01" * raw_len).decode()})
    with pytest.raises(KeyFileError, match=f"{field}.*32 bytes") as info:
        KeyPair.load(path)
    assert str(path) in str(info.value)


def test_wrong_public_key_length_in_enrollment_is_refused(tmp_path: Path) -> None:
    enr = Enrollment("test", KeyPair.generate("aggregator", "aggregator").public())
    enr.add(KeyPair.generate("site", "site-a").public())
    path = tmp_path / "enrollment.json"
    enr.save(path)
    doc = json.loads(path.read_text())
    doc["sites"]["site-a"]["box_pub"] = base64.b64encode(b"\x00" * 33).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="sites.site-a.box_pub") as info:
        Enrollment.load(path)
    assert str(path) in str(info.value)


def test_wrong_file_type_is_refused(tmp_path: Path) -> None:
    kp = KeyPair.generate("site", "site-a")
    pub = tmp_path / "site-a.pub"
    kp.public().save(pub)
    os.chmod(pub, 0o600)
    with pytest.raises(KeyFileError, match="expected a fedline private-key file") as info:
        KeyPair.load(pub)  # a public key handed where the private key is expected
    assert str(pub) in str(info.value)
    priv = tmp_path / "site-a.key"
    kp.save(priv)
    with pytest.raises(KeyFileError, match="expected a fedline enrollment file"):
        Enrollment.load(priv)
    with pytest.raises(KeyFileError, match="expected a fedline public-key file"):
        PublicKeys.load(priv)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not json at all", "not JSON"),
        (b"\xff\xfe\x00garbage", "cannot read"),
        (b"[1, 2, 3]", "wrong file type"),
        (b'{"fedline": "private-key", "version": 2}', "version 2"),
        (b'{"fedline": "private-key", "version": 1, "id": "site-a", "role": "king"}', "role"),
        (b'{"fedline": "private-key", "version": 1, "id": "a/b", "role": "site"}', "'/'"),
        (b'{"fedline": "private-key", "version": 1, "id": "site-a", "role": "site", "sign_seed": 5}', "base64 string"),
        (
            b'{"fedline": "private-key", "version": 1, "id": "site-a", "role": "site", "sign_seed": "!!"}',
            "not valid base64",
        ),
    ],
)
def test_malformed_private_key_files_name_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=match) as info:
        KeyPair.load(path)
    assert str(path) in str(info.value)


def test_missing_files_are_refused_naming_them(tmp_path: Path) -> None:
    for load in (KeyPair.load, PublicKeys.load, Enrollment.load):
        path = tmp_path / "nowhere" / f"{load.__qualname__}.json"
        with pytest.raises(KeyFileError, match="file not found") as info:
            load(path)
        assert info.value.path == str(path)


def test_enrollment_entry_under_the_wrong_name_is_refused(tmp_path: Path) -> None:
    enr = Enrollment("test", KeyPair.generate("aggregator", "aggregator").public())
    enr.add(KeyPair.generate("site", "site-a").public())
    path = tmp_path / "enrollment.json"
    enr.save(path)
    doc = json.loads(path.read_text())
    doc["sites"]["site-b"] = doc["sites"].pop("site-a")  # site-a's keys filed as site-b
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="expected 'site-b'"):
        Enrollment.load(path)
