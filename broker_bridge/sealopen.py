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

**Placing the plaintext** (``place``): an update's tensors are views into its
plaintext, and where they start depends on the lengths of the headers before
them; a float32 view that does not start on a multiple of 4 bytes makes NumPy
leave BLAS for a scalar loop, so the aggregator used to copy such tensors
(4 MB per 1M-parameter update, :mod:`aggregator.aligned`). With ``place`` the
box is opened as libsodium's ``crypto_box_seal_open`` does it, step by step
(the documented construction: the nonce is BLAKE2b-192 of the ephemeral and
the recipient public key, then ``crypto_box_open_easy``), so that the
plaintext's first bytes can be read before the output buffer is chosen: the
XSalsa20 keystream of those bytes is what encrypting zeros under the same key
and nonce gives. ``place`` reads them and says which plaintext offset should
start on a :data:`ALIGN`-byte boundary; the whole box is then opened there,
authenticated as before. The bytes read early are a placement hint only:
nothing is returned unless the whole box authenticates, and forged bytes can
at most move where an allocation starts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from nacl._sodium import ffi, lib
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey

SEAL_BYTES = int(lib.crypto_box_sealbytes())
_PK_BYTES = int(lib.crypto_box_publickeybytes())
_MAC_BYTES = int(lib.crypto_box_macbytes())
_NONCE_BYTES = int(lib.crypto_box_noncebytes())
_KEY_BYTES = int(lib.crypto_box_beforenmbytes())
#: the boundary ``place``'s offset lands on (a cache line: more than any dtype needs)
ALIGN = 64
#: plaintext bytes ``place`` may read before the box is opened (headers longer than this: no placement)
PEEK_BYTES = 4096

Place = Callable[[memoryview], int | None]


def seal_open(
    ciphertext: bytes | bytearray | memoryview, key: PrivateKey, place: Place | None = None, tail: int | None = None
) -> memoryview:
    """The plaintext of a SealedBox as a read-only memoryview; :class:`CryptoError` when it does not open.

    ``tail``: the plaintext's last ``tail`` bytes should start on an :data:`ALIGN`-byte boundary (an update's
    tensors end its plaintext, and the receiver knows their size: no byte needs reading first, and the box
    opens in libsodium's one call). When ``tail`` does not fit the plaintext, ``place`` decides.
    ``place``: given the plaintext's first bytes (at most :data:`PEEK_BYTES`, not yet authenticated), the
    offset that should land on an :data:`ALIGN`-byte boundary, or None (then anywhere).
    """
    ct = memoryview(ciphertext)
    if ct.ndim != 1 or ct.itemsize != 1:
        ct = ct.cast("B")
    if len(ct) < SEAL_BYTES:
        raise CryptoError("sealed box is shorter than its overhead")
    n = len(ct) - SEAL_BYTES
    if tail is not None and 0 <= tail <= n:
        raw = np.empty(n + ALIGN, np.uint8)
        # the address through cffi, not ``raw.ctypes.data``: that builds a ctypes object per call, about 10 us of
        # a 100k-parameter update's open (BENCHMARKS.md, "The opening's parts")
        dst = ffi.from_buffer(raw)
        shift = -(int(ffi.cast("uintptr_t", dst)) + n - tail) % ALIGN
        dst += shift
        out = raw[shift : shift + n]
    elif place is not None:
        return _open_placed(ct, key, place)
    else:
        out = np.empty(n, dtype=np.uint8)
        dst = ffi.from_buffer(out)
    rc = lib.crypto_box_seal_open(dst, ffi.from_buffer(ct), len(ct), bytes(key.public_key), bytes(key))
    if rc != 0:
        raise CryptoError("An error occurred trying to decrypt the message")
    out.flags.writeable = False
    return memoryview(out.data)


def _open_placed(ct: memoryview, key: PrivateKey, place: Place) -> memoryview:
    """``crypto_box_seal_open`` in its documented steps, with the output placed where ``place`` asks."""
    epk = bytes(ct[:_PK_BYTES])
    nonce = hashlib.blake2b(epk + bytes(key.public_key), digest_size=_NONCE_BYTES).digest()  # libsodium's seal nonce
    shared = ffi.new("unsigned char[]", _KEY_BYTES)
    try:
        if lib.crypto_box_beforenm(shared, epk, bytes(key)) != 0:  # a weak ephemeral key: the seal_open refusal
            raise CryptoError("An error occurred trying to decrypt the message")
        box = ct[_PK_BYTES:]  # MAC || encrypted message
        n = len(box) - _MAC_BYTES
        peek = min(PEEK_BYTES, n)
        stream = np.empty(_MAC_BYTES + peek, np.uint8)  # MAC || keystream of the first ``peek`` bytes
        lib.crypto_box_easy_afternm(ffi.from_buffer(stream), bytes(peek), peek, nonce, shared)
        head = stream[_MAC_BYTES:] ^ np.frombuffer(box, np.uint8, peek, _MAC_BYTES)
        at = place(memoryview(head.data))
        raw = np.empty(n + ALIGN, np.uint8)
        shift = 0 if at is None else -(raw.ctypes.data + at) % ALIGN
        out = raw[shift : shift + n]
        rc = lib.crypto_box_open_easy_afternm(ffi.from_buffer(out), ffi.from_buffer(box), len(box), nonce, shared)
    finally:
        ffi.memmove(shared, bytes(_KEY_BYTES), _KEY_BYTES)  # the shared key is not left in memory
    if rc != 0:
        raise CryptoError("An error occurred trying to decrypt the message")
    out.flags.writeable = False
    return memoryview(out.data)
