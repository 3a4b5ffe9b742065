"""``python -m edgetrust``, the same as the ``edgetrust`` command."""

from edgetrust.cli import main

main()
