"""HSM command layer: payment-security commands over PKCS#11, a software reference and AWS KMS.

The switch never holds clear card-security keys; it calls the commands in ``hsm.api``.
"""
