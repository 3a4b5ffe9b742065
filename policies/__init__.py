"""Policies for devices: runtime (IMA) policies, their DSSE signatures and their creation.

Evaluation returns findings (``evidence.findings.Finding``) and never a bare bool. Nothing here
imports Flask or SQLAlchemy.
"""
