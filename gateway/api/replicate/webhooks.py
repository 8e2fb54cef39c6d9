"""Prediction webhooks: signed as Replicate signs them, sent from the database's outbox, retried.

Each API key has one signing secret (``GET /v1/webhooks/default/secret``), ``whsec_`` and the
base64 of 32 random bytes, made on first use and shared by every replica through the database.
A delivery carries ``webhook-id`` (the same on every retry, so receivers can drop duplicates),
``webhook-timestamp`` (Unix seconds at the attempt) and ``webhook-signature``: ``v1,`` and the
base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` under the secret's bytes (the Standard Webhooks
scheme; ``replicate.webhooks.validate`` checks it).

Any replica sends what is due: it claims a delivery by moving its ``next_attempt_at`` forward in one
conditional update, so two replicas never send the same attempt. A prediction's events go out in
the order they were written: a later one waits until the earlier is delivered or given up. A 2xx
answer delivers; anything else is retried with exponential back-off up to ``MAX_ATTEMPTS``. The
sender runs as a task of its own, so a slow or dead receiver never holds up generation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import and_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from gateway.db.tables import WebhookDelivery, WebhookSecret

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
MAX_ATTEMPTS = 10
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 300.0
ATTEMPT_TIMEOUT_S = 10.0
CLAIM_LEASE_S = 60.0
"""A claimed delivery whose sender died is retried after this long."""
POLL_INTERVAL_S = 1.0
"""How often an idle sender looks for retries and other replicas' deliveries; its own replica's new
deliveries wake it at once."""
BATCH = 20
MAX_ERROR_CHARS = 500


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header's value."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt, after ``attempts`` failed ones: 1, 2, 4, ... up to 300."""
    return min(MAX_RETRY_S, FIRST_RETRY_S * 2.0 ** max(0, attempts - 1))


class WebhookSecrets:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker
        self._known: dict[str, str] = {}

    async def secret(self, key_id: str) -> str:
        """The key's signing secret, made on first use (the first replica to store it wins)."""
        if (known := self._known.get(key_id)) is not None:
            return known
        async with self._sessionmaker() as session:
            stored = await session.scalar(select(WebhookSecret.secret).where(WebhookSecret.key_id == key_id))
        if stored is None:
            try:
                async with self._sessionmaker.begin() as session:
                    session.add(WebhookSecret(key_id=key_id, secret=new_secret(), created_at=datetime.now(UTC)))
            except IntegrityError:
                pass  # another replica stored one first: theirs is the key's secret
            async with self._sessionmaker() as session:
                stored = await session.scalar(select(WebhookSecret.secret).where(WebhookSecret.key_id == key_id))
        if stored is None:
            raise RuntimeError(f"no webhook secret could be stored for key {key_id}")
        self._known[key_id] = stored
        return stored


@dataclass(frozen=True, slots=True)
class Due:
    seq: int
    id: str
    key_id: str
    url: str
    body: str
    attempts: int


class WebhookSender:
    """Sends due deliveries until stopped; ``wake`` after writing one to send it at once."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], webhook_secrets: WebhookSecrets) -> None:
        self._sessionmaker = sessionmaker
        self._secrets = webhook_secrets
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=ATTEMPT_TIMEOUT_S, follow_redirects=False)
        self._task = asyncio.create_task(self._run(), name="webhook sender")

    def wake(self) -> None:
        self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while True:
            try:
                sent = await self.send_due()
            except Exception as exc:  # the database may be away for a while: keep trying
                logger.warning("webhook deliveries could not be read: %s", str(exc) or type(exc).__name__)
                sent = 0
            if sent:
                continue  # more may be due (the next event of each prediction)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL_S):
                    await self._wake.wait()
            self._wake.clear()

    async def send_due(self) -> int:
        """Claim and send what is due now; the number of deliveries attempted."""
        claimed = await self._claim()
        await asyncio.gather(*(self._attempt(due) for due in claimed))
        return len(claimed)

    async def _claim(self) -> list[Due]:
        now = datetime.now(UTC)
        earlier = aliased(WebhookDelivery)
        open_earlier = (
            select(earlier.seq)
            .where(
                earlier.prediction_id == WebhookDelivery.prediction_id,
                earlier.seq < WebhookDelivery.seq,
                earlier.delivered_at.is_(None),
                earlier.abandoned_at.is_(None),
            )
            .exists()
        )
        query = (
            select(WebhookDelivery)
            .where(
                WebhookDelivery.delivered_at.is_(None),
                WebhookDelivery.abandoned_at.is_(None),
                WebhookDelivery.next_attempt_at <= now,
                ~open_earlier,
            )
            .order_by(WebhookDelivery.seq)
            .limit(BATCH)
        )
        claimed: list[Due] = []
        async with self._sessionmaker.begin() as session:
            for row in list(await session.scalars(query)):
                taken = await session.execute(
                    update(WebhookDelivery)
                    .where(and_(WebhookDelivery.seq == row.seq, WebhookDelivery.next_attempt_at == row.next_attempt_at))
                    .values(
                        next_attempt_at=now + timedelta(seconds=CLAIM_LEASE_S),
                        attempts=WebhookDelivery.attempts + 1,
                    )
                )
                if taken.rowcount:  # type: ignore[attr-defined]
                    claimed.append(Due(row.seq, row.id, row.key_id, row.url, row.body, row.attempts + 1))
        return claimed

    async def _attempt(self, due: Due) -> None:
        client = self._client
        assert client is not None, "start() the sender first"
        timestamp = int(time.time())
        try:
            secret = await self._secrets.secret(due.key_id)
            headers = {
                "content-type": "application/json",
                "user-agent": "llama-gateway-webhooks",
                "webhook-id": due.id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": signature(secret, due.id, timestamp, due.body),
            }
            response = await client.post(due.url, content=due.body.encode(), headers=headers)
            error = None if 200 <= response.status_code < 300 else f"answered {response.status_code}"
        except (httpx.HTTPError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        await self._settle(due, error)

    async def _settle(self, due: Due, error: str | None) -> None:
        now = datetime.now(UTC)
        if error is None:
            values: dict[str, object] = {"delivered_at": now, "last_error": None}
        elif due.attempts >= MAX_ATTEMPTS:
            logger.warning("webhook %s to %s given up after %d attempts: %s", due.id, due.url, due.attempts, error)
            values = {"abandoned_at": now, "last_error": error}
        else:
            retry_at = now + timedelta(seconds=retry_delay(due.attempts))
            values = {"next_attempt_at": retry_at, "last_error": error}
        async with self._sessionmaker.begin() as session:
            await session.execute(update(WebhookDelivery).where(WebhookDelivery.seq == due.seq).values(**values))
