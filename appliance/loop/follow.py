"""Every replica follows the durable choices: the serving version and the shadow setting.

``AdminService.LoadModel`` switches the replica that takes the call and records the choice in
``models/<name>/SERVING``; the other replicas (one per node, or several ingress processes on
one) read that record every ``interval`` seconds and bring the chosen version in themselves:
verified, opened and warmed before one assignment swaps it in, so no request fails and none waits.
A version this replica cannot load keeps the old one serving here (logged; tried again when the
record changes, or after ``RETRY_S``, so a repaired version is picked up). ``SHADOW`` is read
the same way and handed to the shadow runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from appliance.errors import ApplianceError
from appliance.loop.choices import ShadowChoice, read_shadow
from appliance.store import ModelStore

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
RETRY_S = 60.0  # a recorded version that failed to load here is tried again after this long


class Follows(Protocol):
    def served_versions(self) -> dict[str, int]:
        """Name -> the version a bare name gets on this replica now."""
        ...

    async def follow_serving(self, name: str, version: int) -> None:
        """Serve ``version`` for a bare ``name`` here without writing the record."""
        ...

    def follow_shadow(self, name: str, choice: ShadowChoice | None) -> None: ...


class ChoiceFollower:
    def __init__(self, runtime: Follows, store: ModelStore, interval: float = DEFAULT_INTERVAL_S) -> None:
        self.runtime = runtime
        self.store = store
        self.interval = interval
        self._failed: dict[str, tuple[int, float]] = {}  # name -> (version that failed here, when)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="follow-choices")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad record
                log.exception("following the serving choices failed")

    def _recently_failed(self, name: str, version: int) -> bool:
        failed = self._failed.get(name)
        return failed is not None and failed[0] == version and time.monotonic() - failed[1] < RETRY_S

    async def check(self) -> None:
        """One pass: switch to recorded versions that differ from what is served here."""
        for name, version in self.runtime.served_versions().items():
            recorded = await asyncio.to_thread(self.store.serving_version, name)
            self.runtime.follow_shadow(name, await asyncio.to_thread(read_shadow, self.store, name))
            if recorded is None or recorded == version or self._recently_failed(name, recorded):
                continue
            try:
                await self.runtime.follow_serving(name, recorded)
            except ApplianceError as exc:
                self._failed[name] = (recorded, time.monotonic())
                log.error("%s:%s was chosen but cannot serve here: %s", name, recorded, exc.message)
            else:
                self._failed.pop(name, None)
                log.info("following the serving choice: %s:%s (was %s)", name, recorded, version)
