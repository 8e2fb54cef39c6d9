"""What the fault scenarios share: a TCP proxy that can cut a service off, and throwaway databases."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid

import asyncpg
from sqlalchemy.engine import make_url

_CHUNK = 65536


class TcpProxy:
    """Forwards a loopback port to a service, and can take the service away and give it back.

    ``cut`` resets every connection through the proxy and stops listening, so new connections are
    refused: to its clients the service has gone away, while the real server (shared with others)
    is never touched. ``restore`` listens again on the same port.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._port = free_port()
        self._server: asyncio.Server | None = None
        self._links: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self._port, reuse_address=True)

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Reset rather than cancel: the pumps end on the reset, as they would on a real crash.
        for writers in self._links.values():
            for writer in writers:
                writer.transport.abort()
        if self._links:
            await asyncio.wait(list(self._links))
        if server is not None:
            await server.wait_closed()  # since Python 3.12 this also waits for the links to end

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    async def aclose(self) -> None:
        await self.cut()

    async def _link(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        writers = [client_writer]
        self._links[task] = writers
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
            writers.append(upstream_writer)
            if self._server is None:
                return  # cut while this link was connecting
            async with asyncio.TaskGroup() as pumps:
                pumps.create_task(_pump(client_reader, upstream_writer))
                pumps.create_task(_pump(upstream_reader, client_writer))
        except (OSError, ExceptionGroup):
            pass  # one side went away: the other is reset below
        finally:
            del self._links[task]
            # abort(), not close(): a cut connection must look like a crashed server (RST), not a goodbye.
            for writer in writers:
                writer.transport.abort()


class StallingTcpProxy(TcpProxy):
    """A ``TcpProxy`` that can also hang the service: ``stall`` keeps every connection open and
    accepts new ones, but no byte passes either way until ``flow``, as when a server stops
    answering without closing anything (a frozen process, a partition that drops packets).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self._stalled = False

    def stall(self) -> None:
        self._stalled = True
        for writers in self._links.values():
            for writer in writers:
                writer.transport.pause_reading()

    def flow(self) -> None:
        self._stalled = False
        for writers in self._links.values():
            for writer in writers:
                writer.transport.resume_reading()

    async def _link(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._stalled:
            client_writer.transport.pause_reading()  # what the client sends stays unread until ``flow``
        await super()._link(client_reader, client_writer)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(_CHUNK):
        writer.write(data)
        await writer.drain()
    # The sender finished: end the whole link, as a server closing its socket would.
    raise ConnectionResetError("peer closed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ScratchDatabases:
    """Creates uniquely named PostgreSQL databases on a server, and drops them again."""

    def __init__(self, server_url: str) -> None:
        self._url = make_url(server_url)
        self._created: list[str] = []

    async def _execute(self, sql: str) -> None:
        connection = await asyncpg.connect(self._url.set(drivername="postgresql").render_as_string(False))
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    async def create(self, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        await self._execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return name

    def url(self, database: str, *, port: int | None = None) -> str:
        """An asyncpg URL for ``database``, optionally through another port on the same host (a proxy)."""
        url = self._url.set(drivername="postgresql+asyncpg", database=database)
        if port is not None:
            url = url.set(host="127.0.0.1", port=port)
        return url.render_as_string(False)

    async def drop_all(self) -> None:
        for name in reversed(self._created):
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._created.clear()
