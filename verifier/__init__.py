"""Attestation: the verification engine, the poller, verdicts, and the trust, gate and
admission APIs."""
