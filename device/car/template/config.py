"""Settings of this car. donkeycar.load_config reads them, and myconfig.py beside this file
overrides any of them. Paths are relative to the car directory."""

# Drive loop frequency in Hz; `edgetrust car --rate-hz` overrides it.
DRIVE_LOOP_HZ = 20

# Size of the simulated camera's frames in pixels (DonkeyCar's default camera size).
IMAGE_W = 160
IMAGE_H = 120
# Frames the simulated lane marking takes to sweep across the frame and back.
SIM_MARKING_PERIOD_LOOPS = 100

# The pilot's linear model (JSON weights).
PILOT_MODEL_PATH = "models/pilot.json"

# Drive log file, one JSON line appended per loop. Keep it out of the files that the IMA
# simulator measures, because it changes while the car drives.
DRIVE_LOG_PATH = "data/drive-log.jsonl"

# Loops between two status lines on standard output; `edgetrust car --report-every` overrides it.
REPORT_EVERY_LOOPS = 100
