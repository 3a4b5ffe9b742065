"""What a device presents, parsed and checked: TPM 2.0 structures, quotes, credentials,
EK certificates, IMA measurement lists and UEFI event logs.

Pure functions over bytes: nothing here imports Flask or SQLAlchemy, so the verification core
can be tested, fuzzed and benchmarked on its own.
"""
