"""Device side of edgetrust: TPM access, the agent's persisted identity and enrollment with
the registrar.

``device.errors`` imports nothing from tpm2-pytss; ``device.tpm`` and the modules that use it
need tpm2-pytss and Debian's libtss2 (the ``device`` extra).
"""
