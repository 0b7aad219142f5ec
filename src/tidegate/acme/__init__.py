"""ACME certificates: ordered by one replica at a time, answered and served by every replica.

translate/acme.py says what is wanted (pure). manager.py keeps each wanted certificate: it orders when there
is none, when its names changed or when renewal is due, backing off per name on failure. client.py speaks
ACME (the `acme` library, blocking: it runs in a thread). store.py is the state that replicas share: the
challenges' answers, the account keys, the certificates (as Secrets the file source reads back, so that the
translator serves them as it serves any Secret) and the lock that lets one replica order at a time.
dataplane/acme_challenge.py answers HTTP-01 from that store, in every worker of every replica.
"""
