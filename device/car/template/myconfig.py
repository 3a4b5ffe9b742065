"""Overrides of config.py for this car: uncomment a line and change its value."""

# DRIVE_LOOP_HZ = 10
# REPORT_EVERY_LOOPS = 200
