"""edgetrust: remote attestation for edge-AI fleets (composition root)."""

__version__ = "0.1.0"
