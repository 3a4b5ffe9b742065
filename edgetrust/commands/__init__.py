"""Click command groups of the ``edgetrust`` command, one module each."""
