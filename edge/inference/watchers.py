"""The line's watchers: where new versions and commands come from.

- the aggregator's signed manifest on the federation broker (``model_source = "manifest"``,
  ``edge.inference.manifest``), which also carries the command topic when the line has one client;
- the edge agent's model directory (``model_source = "model_dir"``), polled: ``current.json`` names an
  immutable ``.onnx`` whose hash must match;
- signed line commands (``fedline keys command``): a rollback, from the site's key or the aggregator's.

Why they only *offer*: a watcher hands a version to the loader (``edge.inference.loader``), which alone decides
whether it serves; a malformed message or an unreadable file is refused and counted, never ends the watcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from broker_bridge.envelope import content_hash
from broker_bridge.topics import Topics
from edge.inference.config import InferConfig
from edge.inference.loader import Loader
from edge.inference.model_dir import ModelDirError, read_model, read_pointer
from edge.inference.session import ModelInfo
from fedline.logs import event

log = logging.getLogger("fedline.infer")


class Watchers:
    """The manifest, model-directory and command watchers of one line, offering to its ``loader``."""

    def __init__(self, cfg: InferConfig, topics: Topics, loader: Loader) -> None:
        self.cfg, self.topics, self.loader = cfg, topics, loader
        self._verifier: Any = None  # line commands: built on the first one (reads the key files)

    # ------------------------------------------------------------------ keys
    def _aggregator_sign_pub(self) -> bytes:
        from broker_bridge.keys import Enrollment, PublicKeys

        line = self.cfg.line
        if line.enrollment:
            return Enrollment.load(self.cfg.path(line.enrollment)).aggregator.sign_pub
        assert line.aggregator_key
        return PublicKeys.load(self.cfg.path(line.aggregator_key)).sign_pub

    def _site_keys(self) -> Any:
        from broker_bridge.keys import KeyPair

        assert self.cfg.line.site_key
        keys = KeyPair.load(self.cfg.path(self.cfg.line.site_key))
        if keys.ident != self.cfg.line.site or keys.role != "site":
            raise ValueError(
                f"{self.cfg.line.site_key}: a key of {keys.role} {keys.ident!r}, not of site {self.cfg.line.site!r}"
            )
        return keys

    # ------------------------------------------------------------------ the manifest
    async def manifest(self, client: Any) -> None:
        """Follow the signed manifest and its ONNX chunks on the federation broker (and the command topic)."""
        from edge.inference.manifest import ManifestWatcher

        loader = self.loader
        watcher = ManifestWatcher(
            self.topics,
            self._aggregator_sign_pub(),
            self._site_keys(),
            loader.current_version,
            loader.refuse,
            max_bytes=self.cfg.line.max_model_bytes,
        )
        for flt in watcher.filters():
            await client.subscribe(flt, 1)
        cmd = self.cfg.line.command_topic
        async for msg in client.messages():
            if cmd and msg.topic == cmd:
                await self.command(msg.payload)
                continue
            try:
                fetched = watcher.handle(msg.topic, msg.payload)
            except Exception as exc:  # a malformed message must never end the watcher
                loader.refuse("schema", f"message on {msg.topic!r}: {type(exc).__name__}: {exc}", None)
                continue
            if fetched is not None:
                meta = {"created_at": fetched.manifest.get("created_at")}
                loader.offer(ModelInfo(fetched.version, fetched.hash, "manifest", meta, fetched.seen_at), fetched.blob)

    # ------------------------------------------------------------------ the model directory
    async def model_dir(self) -> None:
        """Poll the edge agent's model directory every ``poll_s``; an unreadable one is reported once."""
        model_dir = self.cfg.path(self.cfg.line.model_dir or ".")
        reported: set[Any] = set()
        offered: set[tuple[int, str]] = set()
        while True:
            try:
                await self._poll_model_dir(model_dir, reported, offered)
            except OSError as exc:  # unreadable folder or file: say so, keep polling
                if repr(exc) not in reported:
                    reported.add(repr(exc))
                    event(log, "model_dir.unreadable", level=logging.WARNING, path=str(model_dir), error=str(exc))
            await asyncio.sleep(self.cfg.line.poll_s)

    async def _poll_model_dir(self, model_dir: Path, reported: set[Any], offered: set[tuple[int, str]]) -> None:
        """One look at ``current.json``: offer a new, intact version to the loader."""
        loader = self.loader
        try:
            ptr = await asyncio.to_thread(read_pointer, model_dir)
        except ModelDirError as exc:
            if str(exc) not in reported:
                reported.add(str(exc))
                loader.refuse("schema", str(exc), None)
            ptr = None
        if ptr is not None and loader.is_new(ptr.version, ptr.hash):
            seen = time.monotonic()
            blob = await asyncio.to_thread(read_model, model_dir, ptr)
            if blob is None:
                pass  # replaced meanwhile: read the new pointer next time
            elif content_hash(blob) != ptr.hash:
                if (ptr.version, ptr.hash, "hash") not in reported:  # retried each poll, reported once
                    reported.add((ptr.version, ptr.hash, "hash"))
                    loader.refuse(
                        "hash",
                        f"{model_dir / ptr.file} ({len(blob)} bytes) does not match the hash in current.json",
                        ptr.version,
                    )
            elif (ptr.version, ptr.hash) not in offered:  # offered once; the loader decides
                offered.add((ptr.version, ptr.hash))
                loader.offer(ModelInfo(ptr.version, ptr.hash, "model_dir", ptr.meta, seen), blob)

    # ------------------------------------------------------------------ commands
    async def commands(self, client: Any) -> None:
        """The command topic on a client of its own (when the manifest watcher does not read it)."""
        await client.subscribe(self.cfg.line.command_topic, 1)
        async for msg in client.messages():
            if msg.topic == self.cfg.line.command_topic:
                await self.command(msg.payload)

    def _command_verifier(self) -> Any:
        """Who may command this line: its site's key and the aggregator's (whichever are configured)."""
        from broker_bridge.line_command import CommandVerifier

        if self._verifier is None:
            line = self.cfg.line
            signers = {}
            if line.site_key:
                signers["site"] = bytes(self._site_keys().signing_key.verify_key)
            if line.enrollment or line.aggregator_key:
                signers["aggregator"] = self._aggregator_sign_pub()
            self._verifier = CommandVerifier(signers, line.federation, line.site)
        return self._verifier

    async def command(self, payload: bytes) -> None:
        """A signed command (``fedline keys command``); unsigned or replayed ones are refused and counted."""
        from broker_bridge.errors import WireError

        try:
            signer, _ = self._command_verifier().verify(payload)
        except WireError as exc:
            self.loader.refuse("command", f"command refused ({exc.reason}): {exc.detail}", None)
            return
        await self.loader.rollback(f"command topic, signed by the {signer}")
