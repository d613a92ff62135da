"""Pure payment-cryptography compositions over a block-cipher primitive.

What lives here: ISO 9564 PIN blocks (formats 0, 1, 3, 4), Visa PVV and IBM 3624 (``pin``),
CVV/CVV2/iCVV (``cvv``), EMV ICC key and session key derivation, ARQC and ARPC (``emv``),
and the primitive protocol with the MAC and padding helpers they share (``primitive``).

What does not: keys or their storage. Every function takes a ``BlockCipher`` and opaque key
handles, so the same code runs over clear keys in ``hsm.software`` and over token objects in
``hsm.pkcs11`` (where derived EMV keys never leave the token).
"""
