"""What a device is allowed to be: runtime (IMA) policies, their signatures and their creation.

Evaluation returns findings (``evidence.findings.Finding``) and never a bare bool. Nothing here
imports Flask or SQLAlchemy.
"""
