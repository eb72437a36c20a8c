"""Result records of the test host's scenarios, written as JSON lines to
the test host's second serial port (see hwhost_driver.py for the format)."""

import json

from l2_vm import Failed


class Results:
    """Writes result records for the scenario being run."""

    def __init__(self, path):
        self.f = open(path, "w", buffering=1)
        self.scenario = None

    def emit(self, rec):
        rec.setdefault("scenario", self.scenario)
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.f.flush()

    def check(self, name, ok, detail=None):
        """Records a check; a failed one ends the scenario."""
        self.emit({"t": "check", "check": name, "ok": bool(ok), "detail": detail})
        if not ok:
            raise Failed(f"check '{name}' failed: {detail}")

    def figure(self, name, value, unit=""):
        self.emit({"t": "figure", "name": name, "value": value, "unit": unit})

    def data(self, name, value):
        self.emit({"t": "data", "name": name, "value": value})
