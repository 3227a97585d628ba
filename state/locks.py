"""Service locks: leases held by running deployments, and manual locks held until unlocked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from state.base import Repository, json_of
from state.events import DeploymentState, utcnow
from state.schema import deployments, locks

log = logging.getLogger(__name__)

LOCK_POLL_INTERVAL = 0.2
# deployments whose lease a holder renews along with its locks
RENEWED_STATES = (str(DeploymentState.QUEUED), str(DeploymentState.RUNNING))


class LockBusy(Exception):
    """A service is locked by another holder."""

    def __init__(self, service: str, holder: str, reason: str | None = None) -> None:
        self.service, self.holder, self.reason = service, holder, reason
        because = f" ({reason})" if reason else ""
        super().__init__(f"{service} is locked by {holder}{because}")


class LockLost(Exception):
    """A lock the holder should hold is gone or held by someone else (its lease ran out)."""

    def __init__(self, lost: dict[str, str | None]) -> None:
        self.lost = lost  # service -> who holds it now (None: nobody)
        names = ", ".join(f"{s} ({h or 'free'})" for s, h in sorted(lost.items()))
        super().__init__(f"lost the lock(s) on {names}")


@dataclass
class LockRecord:
    service: str
    holder: str
    reason: str | None
    acquired_at: datetime
    expires_at: datetime | None  # None: a manual lock, held until `unlock`

    def to_json(self) -> dict[str, Any]:
        return json_of(self)


@dataclass
class UnlockResult:
    """What `store.locks.unlock` did: removed a lock, found none, or left a deployment's lease."""

    removed: bool
    # the live lease of a running deployment that was left in place (unlock without force)
    deployment_lock: LockRecord | None = None

    def __bool__(self) -> bool:
        return self.removed


async def delete_expired_locks(conn: AsyncConnection, now: datetime, *where: Any) -> None:
    """Reclaim leases that ran out: their holders died (inside the caller's transaction)."""
    await conn.execute(
        locks.delete().where(*where, locks.c.expires_at.is_not(None), locks.c.expires_at < now)
    )


async def take_locks(
    conn: AsyncConnection,
    wanted: list[str],
    holder: str,
    now: datetime,
    *,
    expires_at: datetime | None,
    reason: str | None,
    new_reason: bool = False,
) -> None:
    """Lock `wanted` for `holder` until `expires_at` (None: until unlocked), inside the caller's
    transaction; LockBusy when another holder has one. Locks `holder` has already get the new
    expiry (and, with `new_reason`, the new reason)."""
    # a lease that ran out belongs to a holder that died: reclaim it
    await delete_expired_locks(conn, now, locks.c.service.in_(wanted))
    held = (await conn.execute(locks.select().where(locks.c.service.in_(wanted)))).all()
    for row in held:
        if row.holder != holder:
            raise LockBusy(row.service, row.holder, row.reason)
    mine = {row.service for row in held}
    if mine:
        renewed: dict[str, Any] = {"expires_at": expires_at}
        if new_reason:
            renewed["reason"] = reason
        await conn.execute(locks.update().where(locks.c.service.in_(mine)).values(**renewed))
    missing = [name for name in wanted if name not in mine]
    if missing:
        new = {"holder": holder, "reason": reason, "acquired_at": now, "expires_at": expires_at}
        await conn.execute(locks.insert(), [{"service": name, **new} for name in missing])


class LockRepository(Repository):
    """The locks table; a deployment's lease is renewed together with its locks."""

    async def acquire(
        self,
        services: Iterable[str],
        holder: str,
        *,
        lease: timedelta,
        wait: float = 0,
        reason: str | None = None,
    ) -> None:
        """Lock every service for `holder`, all or none; wait up to `wait` s, then LockBusy."""
        wanted = sorted(set(services))
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            try:
                await self._try_locks(wanted, holder, lease, reason)
                return
            except LockBusy:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
            await asyncio.sleep(LOCK_POLL_INTERVAL)

    async def _try_locks(
        self, wanted: list[str], holder: str, lease: timedelta, reason: str | None
    ) -> None:
        now = utcnow()
        try:
            async with self.engine.begin() as conn:
                await take_locks(conn, wanted, holder, now, expires_at=now + lease, reason=reason)
        except IntegrityError:
            # another holder inserted one of them between our read and our write
            async with self.engine.connect() as conn:
                other = (
                    await conn.execute(
                        locks.select()
                        .where(locks.c.service.in_(wanted), locks.c.holder != holder)
                        .limit(1)
                    )
                ).first()
            if other is None:
                raise LockBusy(wanted[0], "another deployment") from None
            raise LockBusy(other.service, other.holder, other.reason) from None

    async def renew(
        self, holder: str, lease: timedelta, services: Iterable[str] | None = None
    ) -> None:
        """Extend the leases of `holder`'s locks and of its running deployments.

        With `services` (the ones `holder` locked), raise LockLost, renewing nothing, when any
        of them is gone or held by someone else: its lease ran out and another process took it.
        """
        until = utcnow() + lease
        async with self.engine.begin() as conn:
            if services is not None:
                await self._check_held(conn, holder, set(services))
            await conn.execute(
                locks.update()
                .where(locks.c.holder == holder, locks.c.expires_at.is_not(None))
                .values(expires_at=until)
            )
            await conn.execute(
                deployments.update()
                .where(
                    deployments.c.holder == holder,
                    deployments.c.state.in_(RENEWED_STATES),
                )
                .values(lease_until=until)
            )

    @staticmethod
    async def _check_held(conn: AsyncConnection, holder: str, wanted: set[str]) -> None:
        """Raise LockLost unless `holder` still holds a lock on every service in `wanted`."""
        rows = (await conn.execute(locks.select().where(locks.c.service.in_(wanted)))).all()
        current = {row.service: row.holder for row in rows}
        lost = {name: current.get(name) for name in wanted if current.get(name) != holder}
        if lost:
            raise LockLost(lost)

    @contextlib.asynccontextmanager
    async def keeping(self, holder: str, lease: timedelta) -> AsyncIterator[None]:
        """While the block runs, renew `holder`'s leases (every third of `lease`); at its end,
        release every lock of `holder` (a holder for one acquired lock, e.g. a merge's)."""
        keeper = asyncio.create_task(self._keep(holder, lease), name=f"nixmox-lock-{holder}")
        try:
            yield
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await asyncio.shield(self.release(holder))

    async def _keep(self, holder: str, lease: timedelta) -> None:
        """Renew `holder`'s leases every third of the lease until cancelled."""
        while True:
            await asyncio.sleep(lease.total_seconds() / 3)
            try:
                await self.renew(holder, lease)
            except Exception:
                log.exception("could not renew the locks of %s", holder)

    async def release(self, holder: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                locks.delete().where(locks.c.holder == holder, locks.c.expires_at.is_not(None))
            )

    async def lock(self, service: str, holder: str, reason: str | None = None) -> None:
        """A manual lock (`lock <service>`): no lease, held until `unlock`."""
        now = utcnow()
        try:
            async with self.engine.begin() as conn:
                await take_locks(
                    conn, [service], holder, now, expires_at=None, reason=reason, new_reason=True
                )
        except IntegrityError:
            raise LockBusy(service, "another holder") from None

    async def unlock(self, service: str, *, force: bool = False) -> UnlockResult:
        """Remove a manual lock (or an expired lease); a running deployment's only with `force`."""
        now = utcnow()
        removable = [locks.c.service == service]
        if not force:
            removable.append(sa.or_(locks.c.expires_at.is_(None), locks.c.expires_at < now))
        async with self.engine.begin() as conn:
            result = await conn.execute(locks.delete().where(*removable))
            if result.rowcount > 0:
                return UnlockResult(removed=True)
            row = (await conn.execute(locks.select().where(locks.c.service == service))).first()
        if row is None:
            return UnlockResult(removed=False)
        held = LockRecord(row.service, row.holder, row.reason, row.acquired_at, row.expires_at)
        return UnlockResult(removed=False, deployment_lock=held)

    async def all(self) -> list[LockRecord]:
        """The locks in force (expired leases are not listed)."""
        return await self._in_force()

    async def _in_force(self, *where: sa.ColumnElement[bool]) -> list[LockRecord]:
        now = utcnow()
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    locks.select()
                    .where(sa.or_(locks.c.expires_at.is_(None), locks.c.expires_at >= now), *where)
                    .order_by(locks.c.service)
                )
            ).all()
        return [
            LockRecord(row.service, row.holder, row.reason, row.acquired_at, row.expires_at)
            for row in rows
        ]

    async def lead(self, name: str, holder: str, lease: timedelta) -> LockRecord | None:
        """Take or renew the leased lock `name` for `holder` (one leader among processes).

        The lock in force afterwards: `holder`'s (it leads for `lease` from now), another
        live holder's, or None (released by its holder meanwhile: the next attempt takes it).
        """
        with contextlib.suppress(LockBusy):
            await self._try_locks([name], holder, lease, None)
        return await self.held(name)

    async def held(self, name: str) -> LockRecord | None:
        """The lock on `name` in force (None: free, or its lease ran out)."""
        found = await self._in_force(locks.c.service == name)
        return found[0] if found else None

    async def take_over(self, name: str, dead: str, holder: str, lease: timedelta) -> bool:
        """Replace the leased lock `name` of `dead` (a holder known to be gone) by `holder`'s."""
        async with self.engine.begin() as conn:
            await conn.execute(
                locks.delete().where(
                    locks.c.service == name,
                    locks.c.holder == dead,
                    locks.c.expires_at.is_not(None),
                )
            )
        found = await self.lead(name, holder, lease)
        return found is not None and found.holder == holder
