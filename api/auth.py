"""Bearer-token auth: when API keys are configured, protected routes need ``Authorization: Bearer <key>``.

Keys are compared in constant time against every configured key (no early exit that would leak which
key nearly matched); neither the keys nor the presented token are ever logged.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="an API key from the server's api_keys setting")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def key_matches(token: str, keys: list[str]) -> bool:
    """True when ``token`` equals one of ``keys``; the time taken does not depend on where they differ."""
    presented = token.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key.encode())
    return found


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """FastAPI dependency: passes when no keys are configured or a valid bearer key is presented."""
    keys = [k.get_secret_value() for k in request.app.state.settings.api_keys]
    if not keys:
        return
    if credentials is None or not credentials.credentials:
        raise HTTPException(
            401,
            "this server needs an API key: send the header 'Authorization: Bearer <key>'",
            headers=CHALLENGE,
        )
    if not key_matches(credentials.credentials, keys):
        raise HTTPException(
            401, "the API key is not valid; check it with the server's operator", headers=CHALLENGE
        )
