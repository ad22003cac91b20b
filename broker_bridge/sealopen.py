"""Open a NaCl SealedBox without copying the message, and without holding the GIL while decrypting.

Why not ``nacl.public.SealedBox.decrypt``: for a 4 MB update it copies the
ciphertext into a new ``bytes``, allocates a zero-filled output buffer, and
copies the plaintext once more into ``bytes``: three passes over the update on
top of the decryption itself, all holding the GIL, so the aggregator's opening
threads queued on each other. Here the ciphertext is read in place (any
buffer, e.g. a memoryview into the reassembled message), the plaintext lands
in an uninitialised numpy buffer, and the one libsodium call runs without the
GIL (cffi releases it). Same primitive, same checks: libsodium's
``crypto_box_seal_open`` authenticates before anything is returned.
"""

from __future__ import annotations

import numpy as np
from nacl._sodium import ffi, lib
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey

SEAL_BYTES = int(lib.crypto_box_sealbytes())


def seal_open(ciphertext: bytes | bytearray | memoryview, key: PrivateKey) -> memoryview:
    """The plaintext of a SealedBox as a read-only memoryview; :class:`CryptoError` when it does not open."""
    ct = memoryview(ciphertext)
    if ct.ndim != 1 or ct.itemsize != 1:
        ct = ct.cast("B")
    if len(ct) < SEAL_BYTES:
        raise CryptoError("sealed box is shorter than its overhead")
    out = np.empty(len(ct) - SEAL_BYTES, dtype=np.uint8)
    rc = lib.crypto_box_seal_open(ffi.from_buffer(out), ffi.from_buffer(ct), len(ct), bytes(key.public_key), bytes(key))
    if rc != 0:
        raise CryptoError("An error occurred trying to decrypt the message")
    out.flags.writeable = False
    return memoryview(out.data)
