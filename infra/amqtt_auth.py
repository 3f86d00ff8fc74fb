"""amqtt plugins that enforce mosquitto's password file and ACL (the files infra/mqtt_auth writes).

amqtt's own FileAuthPlugin knows argon2/bcrypt/sha512-crypt hashes only, and its ACL plugin has no
per-user patterns; these two read the very files mosquitto reads, so the registry's PBKDF2-SHA512
hashes work unchanged and both embedded brokers enforce the same rules. SIGHUP re-reads both files,
as it does for mosquitto; the ACL is checked on every publish and delivery, so a revoked device
loses its rights at the reload even on a connection it already holds.

Loaded by amqtt from its config (infra/embedded.py writes it):
  plugins:
    infra.amqtt_auth.RegistryAuthPlugin: {password_file: ..., acl_file: ...}
    infra.amqtt_auth.RegistryTopicPlugin: {password_file: ..., acl_file: ...}
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from infra.mqtt_auth import Acl, allowed, parse_acl, parse_passwd, verify_broker_hash

log = logging.getLogger("arus.amqtt_auth")


class _Files:
    """The parsed files, shared by both plugins of a broker, re-read on SIGHUP."""

    def __init__(self, password_file: str, acl_file: str) -> None:
        self.password_file = Path(password_file)
        self.acl_file = Path(acl_file)
        self.users: dict[str, str] = {}
        self.acl = Acl()
        self.reload()

    def reload(self) -> None:
        users = parse_passwd(self.password_file.read_text())
        acl = parse_acl(self.acl_file.read_text())
        self.users, self.acl = users, acl  # swapped together, between two checks
        log.info("amqtt auth: %d user(s) from %s, ACL from %s", len(users), self.password_file, self.acl_file)


_FILES: dict[tuple[str, str], _Files] = {}


def _files(password_file: str, acl_file: str) -> _Files:
    key = (password_file, acl_file)
    if key not in _FILES:
        _FILES[key] = _Files(password_file, acl_file)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, _on_sighup)
    return _FILES[key]


def _on_sighup(signum: int, frame: Any) -> None:
    for files in _FILES.values():
        try:
            files.reload()
        except (OSError, UnicodeDecodeError) as exc:  # keep the rules in force rather than none
            log.error("amqtt auth: reload failed, keeping the previous files: %s", exc)


@dataclass
class _Config:
    password_file: str = ""
    acl_file: str = ""


class RegistryAuthPlugin(BaseAuthPlugin):
    """CONNECT: the username must be in the password file and the password must match its hash."""

    Config = _Config

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        cfg: Any = self.context.config
        self.files = _files(cfg.password_file, cfg.acl_file)

    async def authenticate(self, *, session: Session) -> bool | None:
        if not session or not session.username:
            return False  # anonymous clients are refused
        stored = self.files.users.get(session.username)
        return stored is not None and verify_broker_hash(session.password or "", stored)


class RegistryTopicPlugin(BaseTopicPlugin):
    """PUBLISH needs write, SUBSCRIBE and every delivery need read, as in mosquitto's ACL file."""

    Config = _Config

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        cfg: Any = self.context.config
        self.files = _files(cfg.password_file, cfg.acl_file)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if not topic or session is None:
            return False
        username = session.username
        if username is not None and username not in self.files.users:
            return False  # removed from the password file (revoked) while connected
        access = "write" if action == Action.PUBLISH else "read"
        return allowed(self.files.acl, username, topic, access)
