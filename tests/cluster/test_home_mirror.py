"""The head's home source and a node's mirror, without Ray: what is shared, what is refused.

(tests/cluster/test_cluster.py runs both over a real cluster, with a signed model.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.serve.home_mirror import HomeMirror, HomeSource


class _Remote:
    """``handle.method.remote(...)`` of a Ray actor, as an awaitable, over a local object."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method

    async def remote(self, *args: Any) -> Any:
        return self._method(*args)


class LocalHandle:
    def __init__(self, source: HomeSource) -> None:
        for name in ("listing", "folder", "file", "node_id"):
            setattr(self, name, _Remote(getattr(source, name)))


def _head(tmp_path: Path) -> Path:
    head = tmp_path / "head"
    (head / "pki").mkdir(parents=True)
    (head / "pki" / "ca.key").write_text("the CA's private key")
    (head / "keys").mkdir()
    (head / "keys" / "signing.key").write_text("the factory's key")
    (head / "tokens").mkdir()
    (head / "tokens" / "tokens.json").write_text(json.dumps({"t1": {"revoked_at": None}}))
    unsigned = head / "models" / "b8" / "1"
    unsigned.mkdir(parents=True)
    (unsigned / "manifest.json").write_text(json.dumps({"name": "b8", "version": 1, "files": {}}))
    return head


def test_the_source_serves_only_what_nodes_share(tmp_path: Path) -> None:
    source = HomeSource(str(_head(tmp_path)))
    for rel in ("pki/ca.key", "keys/signing.key", "../head/pki/ca.key", "models/../pki/ca.key", "pki"):
        with pytest.raises(ValueError, match="not a shared path"):
            source.file(rel)
        with pytest.raises(ValueError, match="not a shared path"):
            source.folder(rel)
    assert source.file("tokens/tokens.json") is not None
    assert set(source.folder("models/b8/1")) == {"manifest.json"}
    listing = source.listing()
    assert listing.models == (("b8", 1),) and set(listing.files) == {"tokens/tokens.json"}


def test_the_mirror_copies_shared_files_and_refuses_an_unverified_model(tmp_path: Path) -> None:
    head = _head(tmp_path)
    node = tmp_path / "node"
    node.mkdir()
    mirror = HomeMirror(node, LocalHandle(HomeSource(str(head))))  # type: ignore[arg-type]
    installed = asyncio.run(mirror.sync_once())
    assert installed == ["tokens/tokens.json"]  # the unsigned version was written, checked, deleted
    assert (node / "tokens" / "tokens.json").read_bytes() == (head / "tokens" / "tokens.json").read_bytes()
    assert not (node / "models" / "b8" / "1").exists()
    assert not list((node / "models" / "b8").iterdir())  # no staging folder left behind
    assert mirror.refused == {"models/b8/1"}  # and not fetched again every second
    (head / "tokens" / "tokens.json").write_text(json.dumps({"t1": {"revoked_at": "now"}}))
    assert asyncio.run(mirror.sync_once()) == ["tokens/tokens.json"]  # a revocation follows
    assert "now" in (node / "tokens" / "tokens.json").read_text()
    assert asyncio.run(mirror.sync_once()) == []  # nothing changed: nothing copied
