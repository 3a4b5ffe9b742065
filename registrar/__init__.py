"""Enrollment of devices over the Keylime registrar API (v2.1-2.5).

A device sends its EK, EK certificate and AK. The registrar checks that the EK certificate
chains to the configured TPM vendor CAs and certifies that EK, and that the AK is a restricted
signing key. A TPM2_MakeCredential / ActivateCredential challenge then proves that the AK lives
in the same TPM as the EK.
"""
