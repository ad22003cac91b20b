"""Fuzz key and enrollment file loading: ``KeyPair.load``, ``PublicKeys.load``, ``Enrollment.load``.

A damaged or hostile key file (copied from the wrong place, truncated, edited
by hand) must give ``KeyFileError`` naming the file, never a traceback from
deep inside ``json`` or ``base64``.
"""

from __future__ import annotations

import json
import os

from _harness import AGGREGATOR, SITE_A, SITE_B, enrollment, instrumented, main, scratch_dir

with instrumented():
    from broker_bridge.keys import Enrollment, KeyPair, PublicKeys

_DIR = scratch_dir("keys")
_FILE = _DIR / "key.json"


def target(data: bytes) -> None:
    if not data:
        return
    kind, body = data[0] % 3, data[1:]
    _FILE.write_bytes(body)
    os.chmod(_FILE, 0o600)
    if kind == 0:
        kp = KeyPair.load(_FILE)
        assert kp.role in ("site", "aggregator")
    elif kind == 1:
        pk = PublicKeys.load(_FILE)
        assert len(pk.sign_pub) == 32 and len(pk.box_pub) == 32
    else:
        enr = Enrollment.load(_FILE)
        assert all(name == keys.ident for name, keys in enr.sites.items())


def seeds() -> list[bytes]:
    out = []
    SITE_A.save(_DIR / "a.key")
    out.append(b"\x00" + (_DIR / "a.key").read_bytes())
    AGGREGATOR.save(_DIR / "agg.key")
    out.append(b"\x00" + (_DIR / "agg.key").read_bytes())
    SITE_B.public().save(_DIR / "b.pub")
    out.append(b"\x01" + (_DIR / "b.pub").read_bytes())
    enrollment().save(_DIR / "enrollment.json")
    out.append(b"\x02" + (_DIR / "enrollment.json").read_bytes())
    out.append(b"\x02" + json.dumps({"fedline": "enrollment", "version": 1}).encode())
    return out


if __name__ == "__main__":
    main(target, seeds())
