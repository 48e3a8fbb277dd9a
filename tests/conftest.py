"""Suite-wide set-up: every test runs offline, against a throw-away APPLIANCE_HOME."""

from __future__ import annotations

import os
import tempfile

from appliance.config import apply_offline_env

apply_offline_env()
# Never touch the user's own store, keys or tokens; tests that need a specific home set their own.
os.environ["APPLIANCE_HOME"] = tempfile.mkdtemp(prefix="appliance-test-home-")
