"""Secure aggregation (Bonawitz et al., CCS 2017) adapted to enrolled keys and FedBuff cohorts.

The wire-level math shared by the site (a cohort *member*) and the aggregator:

* :mod:`.quantise` - weighted deltas to fixed point in Z_{2^32}, sized so a cohort's sum cannot overflow;
* :mod:`.prg` - ChaCha20 mask expansion from 256-bit seeds (libsodium);
* :mod:`.seeds` - pairwise seeds from the enrolled X25519 keys, bound to one cohort announcement;
* :mod:`.shamir` - t-of-n sharing over the prime field 2^256 + 297;
* :mod:`.messages` - signed announcements, sealed share bundles, acks, answers;
* :mod:`.member` and :mod:`.answer_log` - the site's side, with its durable answer log;
* :mod:`.unmask` - the aggregator's side: survivors, acks, share checks, the cohort sum.

The aggregator learns only the sum of the survivors' vectors; see docs/architecture.md,
"Secure aggregation", for the protocol, the threat model and the limits.
"""
