"""What the serving tests share besides fixtures: the test specialist's name and a started app."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.client import Client, Connection

MODEL = "b8"  # the Banking77 subset specialist that tests/serving/conftest.py publishes


@dataclass
class App:
    """A running Serve app of the appliance: where it listens and how to reach it."""

    name: str
    port: int
    home: Path
    connection: Connection
    metrics_port: int | None = None

    def client(self, **overrides: Any) -> Client:
        conn = Connection(**{**self.connection.__dict__, **overrides})
        return Client(conn)
