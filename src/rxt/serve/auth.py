"""API keys: read once, kept only as sha256 digests, and mapped to an owner id.

Every conversation and response is stored under its creator's owner id (a digest of the key),
so another key cannot see it — it gets 404, exactly as for an id that never existed. Keys come
from a file (one per line; ``#`` comments; a line may be ``sha256:<hex>`` so the server never
holds the key itself) or from ``RXT_API_KEYS`` (comma-separated). With no key configured the
server runs in local development mode: every caller is the one owner ``"local"``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

DEV_OWNER = "local"
ENV_VAR = "RXT_API_KEYS"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The accepted keys' digests. ``owner(header)`` → owner id, or None if refused."""

    def __init__(self, digests: list[str]) -> None:
        self._digests = list(dict.fromkeys(digests))

    @property
    def dev_mode(self) -> bool:
        return not self._digests

    def __len__(self) -> int:
        return len(self._digests)

    def owner(self, authorization: str | None) -> str | None:
        if self.dev_mode:
            return DEV_OWNER
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = digest(token.strip())
        # Compare against every digest (constant time each): timing reveals nothing.
        match = None
        for known in self._digests:
            if hmac.compare_digest(presented, known):
                match = known
        return None if match is None else f"key:{match[:32]}"

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: str | None = None) -> KeyRing:
        """Keys from ``path`` and from ``env`` (default: the ``RXT_API_KEYS`` variable)."""
        digests: list[str] = []
        if path is not None:
            file = Path(path)
            try:
                lines = file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"API keys file {file}: {exc.strerror or exc}") from exc
            for number, raw in enumerate(lines, 1):
                line = raw.split("#", 1)[0].strip()
                if line:
                    digests.append(_parse(line, f"{file}:{number}"))
            if not digests:
                raise ValueError(f"API keys file {file}: no keys in it")
        value = os.environ.get(ENV_VAR, "") if env is None else env
        digests += [_parse(k.strip(), ENV_VAR) for k in value.split(",") if k.strip()]
        return cls(digests)


def _parse(entry: str, where: str) -> str:
    if entry.startswith("sha256:"):
        hexdigest = entry.removeprefix("sha256:").lower()
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise ValueError(f"{where}: 'sha256:' must be followed by 64 hex digits")
        return hexdigest
    if len(entry) < 8 or any(c.isspace() for c in entry):
        raise ValueError(f"{where}: an API key must be at least 8 characters, without spaces")
    return digest(entry)
