"""Fuzz ``envelope.open_update``: the aggregator's front door for every sealed update.

Three ways in, chosen by the first byte, so the fuzzer reaches every check and
not only the first one (random ciphertext never decrypts):

- 0: the bytes as they arrive from the broker (framing, version, decrypt);
- 1: the bytes sealed to the aggregator (an attacker who knows its public key,
  which everyone does): the signature block and its parsing;
- 2: the bytes as an update plaintext, signed by an enrolled site and sealed
  (a site that is enrolled but hostile): header JSON or binary (FLU version 2), schema, counter, tensors
  (FLT1, or FLT2 of the layouts registered below, as the aggregator registers its model's);
- 3: as 2, but the signer is not enrolled or claims another site's id;
- 4 and 5: as 2 and 3 with the signature block without the verify key (FLS2: checked with the enrolled key).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from _harness import AGGREGATOR, OUTSIDER, SITE_A, enrollment, instrumented, main
from nacl.public import PublicKey, SealedBox

with instrumented():
    from broker_bridge import envelope, layouts

ENROLLMENT = enrollment()
SHAPES = {"body.0.weight": (4, 3), "body.0.bias": (4,)}
layouts.register_model(SHAPES)
_BOX = SealedBox(PublicKey(bytes(AGGREGATOR.box_key.public_key)))
_seen: set[tuple[str, int]] = set()


def _is_new(site: str, counter: int) -> bool:
    """A replay guard like the aggregator's; counters seen twice are refused ('replay')."""
    key = (site, counter)
    if key in _seen:
        return False
    if len(_seen) > 10_000:
        _seen.clear()
    _seen.add(key)
    return True


def _signed(signer, claimed: str, plain: bytes, keyless: bool = False) -> bytes:
    site = claimed.encode()
    sig = signer.signing_key.sign(envelope.digest(site + b"\x00" + plain, envelope._UPDATE_DOMAIN)).signature
    if keyless:
        return b"FLS2" + bytes([len(site)]) + site + sig + plain
    return b"FLS1" + bytes([len(site)]) + site + bytes(signer.signing_key.verify_key) + sig + plain


def _seal(inner: bytes) -> bytes:
    return b"FLE" + bytes([envelope.FORMAT_VERSION]) + _BOX.encrypt(inner)


def target(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 6, data[1:]
    if mode == 0:
        blob = body
    elif mode == 1:
        blob = _seal(body)
    elif mode in (2, 4):
        blob = _seal(_signed(SITE_A, "site-a", body, keyless=mode == 4))
    else:
        blob = _seal(_signed(OUTSIDER, "site-b" if data[0] & 4 else "site-x", body, keyless=mode == 5))
    header, tensors = envelope.open_update(blob, AGGREGATOR, ENROLLMENT, _is_new)
    # Whatever is accepted must be a well-formed update from the key that signed it.
    assert mode in (2, 4) and header.site == "site-a", (mode, header)
    assert all(isinstance(a, np.ndarray) for a in tensors.values())


def seeds() -> list[bytes]:
    head = envelope.UpdateHeader(
        site="site-a",
        counter=7,
        msg_id="site-a-u7",
        base_version=2,
        n_samples=64,
        privacy={"epsilon": 0.5, "noise_multiplier": 1.1},
        created_at=1.0e9,
    )
    tensors = {"body.0.weight": np.ones((4, 3), np.float32), "body.0.bias": np.zeros(4, np.float32)}
    plain = envelope.encode_update(head, tensors)
    head8 = dataclasses.replace(head, counter=8)
    compact = envelope.encode_update(head8, tensors, by_reference=True, binary=True)  # FLU 2 | binary | FLT2
    sealed = envelope.seal_update(head, tensors, SITE_A, bytes(AGGREGATOR.box_key.public_key))
    return [
        b"\x00" + sealed,
        b"\x01" + _signed(SITE_A, "site-a", plain),
        b"\x02" + plain,
        b"\x03" + plain,
        b"\x0f" + plain,  # mode 3, claiming site-b
        b"\x04" + compact,
        b"\x05" + compact,
        b"\x0b" + plain,  # mode 5, an outsider claiming site-x (\x05: site-b)
        b"\x02" + plain[:40],
        b"\x02" + compact,
        b"\x02" + compact[:30],
    ]


if __name__ == "__main__":
    main(target, seeds())
