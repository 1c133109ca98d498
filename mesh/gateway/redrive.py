"""The gateway's ``redrive`` operation: dead letters back into their queues, for operators
and for the bridge's callers.

Why the gateway does it: in a provisioned mesh no one else may write to an agent's queue, so
the broker itself keeps everything that reaches a queue on a path the gateway decided; a
redrive through the operator's own connection would need that right for the operator.  The
operator asks with a request (``mesh dead redrive``), which passes the pipeline like any
other (the policy must allow the operator's principal ``request`` on ``<gateway>.redrive``);
the gateway reads each dead letter from ``mesh.dead`` itself, so the operator names only an
offset, never the content.  For each dead letter it checks:

- who asks is an operator (a principal of kind ``operator``, connected as its broker user),
  or a principal that delegates (the bridge, connected as its broker user) asking on behalf
  of a token user (``x-mesh-on-behalf-of``) whom the policy lets request ``redrive``: the
  authorize stage checked both already, and they are checked again here, since this
  operation writes to any queue;
- the dead letter is an event, from a behaviour's queue (``redrive.queue_agent``);
- it was dead-lettered by the broker user that owns that queue (the user of the principal
  its agent belongs to), as RabbitMQ verified it (``x-mesh-dead-by-user``), so a dead letter
  an agent forged naming another's queue goes nowhere; in open mode (no policy) nothing says
  whose a queue is, and only ``force`` redrives;
- it was not redriven before (unless ``again``).

Each decision is audited (stage ``redrive``) before anything is sent; the copy goes to the
queue through the default exchange, mandatory and confirmed, and only then is the dead
letter marked redriven.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

from mesh import topology
from mesh.agent import Agent
from mesh.audit import AuditRecord, Decision, payload_sha256
from mesh.deadlist import DeadLetter, read_dead_letters, stream_end
from mesh.envelope import H_ON_BEHALF_OF, Message
from mesh.gateway.audit import AuditTrail
from mesh.gateway.pipeline import Unavailable
from mesh.membership import REDIS_DOWN
from mesh.policy import Policy
from mesh.policy.users import broker_user
from mesh.redrive import (
    REDRIVE,
    RedriveMark,
    RedriveMarks,
    RedriveReport,
    RedriveRequest,
    RedriveResult,
    Refusal,
    describe_mark,
    queue_agent,
    redrive_copy,
)
from mesh.transport import PublishError, Unroutable, settle

logger = logging.getLogger(__name__)

STAGE = "redrive"


class RedriveRefused(Exception):
    """Who asks may not redrive dead letters (the request as a whole is refused)."""


@dataclass(frozen=True)
class _Asked:
    """One request: its message, the principal asking (the operator, or the user the
    bridge acts for; ``None`` in open mode), what it asks, and the delegating principal
    that sent it for ``asker`` (the bridge), if any."""

    msg: Message
    asker: str | None
    request: RedriveRequest
    delegated_by: str | None = None


class Redriver:
    """Answers ``_req.<gateway>.redrive`` for ``gateway`` under ``policy`` (``None``: open
    mode), recording each decision in ``trail``."""

    def __init__(self, gateway: Agent, policy: Policy | None, trail: AuditTrail) -> None:
        self.gateway = gateway
        self.policy = policy
        self.trail = trail
        self.namespace = gateway.settings.namespace
        self.marks = RedriveMarks(gateway.redis, self.namespace)

    async def __call__(self, msg: Message, request: RedriveRequest) -> RedriveReport:
        asked = await self._asked(msg, request)
        ids = sorted(set(request.ids))
        found = await self._read(ids)
        marks = await self.marks.of(ids)
        return RedriveReport(
            results=[await self._one(asked, i, found.get(i), marks.get(i)) for i in ids]
        )

    async def _asked(self, msg: Message, request: RedriveRequest) -> _Asked:
        """The request, with the principal asking (in open mode anyone may ask);
        ``RedriveRefused`` unless it is an operator on its own connection or a token user
        the bridge asks for."""
        if self.policy is None:
            return _Asked(msg, None, request)
        agent = msg.app_id or ""
        principal = self.policy.principal_for_agent(agent)
        own_user = principal is not None and msg.user_id == broker_user(
            self.namespace, principal.name
        )
        on_behalf_of = msg.headers.get(H_ON_BEHALF_OF)
        if principal is not None and own_user:
            if on_behalf_of is None and principal.kind == "operator":
                return _Asked(msg, principal.name, request)
            if isinstance(on_behalf_of, str) and self.policy.decide(
                agent,
                "request",
                topology.request_key(self.gateway.id, REDRIVE),
                on_behalf_of=on_behalf_of,
            ).allowed:
                return _Asked(msg, on_behalf_of, request, delegated_by=principal.name)
        reason = (
            f"agent {agent!r} (user {msg.user_id!r}) is not an operator of the policy: "
            "only principals of kind operator, or the bridge for a user the policy lets "
            "request redrive, redrive dead letters"
        )
        try:
            asker = None if principal is None else principal.name
            await self._audit(_Asked(msg, asker, request), "denied", reason)
        except Unavailable as exc:
            logger.error("redrive refused to %s, not audited: %s", msg.app_id, exc)
        raise RedriveRefused(reason)

    async def _read(self, ids: list[int]) -> dict[int, DeadLetter]:
        channel = await self.gateway.transport.open_channel()
        try:
            end = await stream_end(channel)
            if end is None:
                return {}
            wanted = set(ids)
            return {
                dead.offset: dead
                async for dead in read_dead_letters(channel, min(end, ids[-1]), ids[0])
                if dead.offset in wanted
            }
        finally:
            await settle(channel.close())

    async def _one(
        self, asked: _Asked, id: int, dead: DeadLetter | None, mark: RedriveMark | None
    ) -> RedriveResult:
        request = asked.request
        if dead is None:
            return RedriveResult(
                id=id,
                outcome="refused",
                reason=f"mesh.dead holds no dead letter {id} (past its retention, or never filed)",
                refusal="unknown",
            )
        result = partial(RedriveResult, id=id, queue=dead.queue, topic=dead.topic)
        refusal: Refusal = "not allowed"
        if mark is not None and not request.again:
            refusal = "redriven"
            allowed, why = False, (
                f"redriven already ({describe_mark(mark)}, into {mark.queue}); "
                "--again redrives it once more"
            )
        else:
            allowed, why = self._check(dead, request.force)
        if request.dry_run:
            if allowed:
                return result(outcome="would redrive", reason=why)
            return result(outcome="refused", reason=why, refusal=refusal)
        if not allowed:
            try:
                audit = await self._audit(asked, "denied", f"dead letter {id}: {why}", dead)
            except Unavailable as exc:
                logger.error("redrive of dead letter %d refused, not audited: %s", id, exc)
                audit = None
            return result(outcome="refused", reason=why, audit=audit, refusal=refusal)
        if not await self.marks.claim(id):
            return result(
                outcome="refused", reason="another redrive of it is under way", refusal="busy"
            )
        try:
            return await self._redrive(asked, dead, why, result)
        finally:
            await self.marks.release(id)

    def _check(self, dead: DeadLetter, force: bool) -> tuple[bool, str]:
        """Whether ``dead`` may go back to its queue, and why (not)."""
        queue, by = dead.queue, dead.dead_by_user
        if dead.type != "event":
            return False, f"a {dead.type} is not redriven: whoever waited for it stopped long ago"
        agent = queue_agent(queue)
        if agent is None:
            return False, f"{queue} is no behaviour's queue: only those take dead letters back"
        if self.policy is None:
            if force:
                return True, f"open mode, forced: {queue}'s owner not verified"
            return False, (
                f"open mode: no policy says whose {queue} is, so nothing shows that "
                f"{by or 'whoever sent it'} may send it there; --force redrives it anyway"
            )
        principal = self.policy.principal_for_agent(agent)
        if principal is None:
            return False, f"agent {agent!r} of {queue} is no principal of the policy"
        owner = broker_user(self.namespace, principal.name)
        if by is None:
            return False, (
                f"no verified user dead-lettered it ({dead.reason}), so nothing shows that "
                f"{owner}, whose queue {queue} is, did"
            )
        if by != owner:
            return False, (
                f"dead-lettered by user {by}, not by {owner}, whose queue {queue} is "
                f"(principal {principal.name!r}): a dead letter goes back only in its "
                "queue's owner's name"
            )
        return True, f"dead-lettered by {owner}, whose queue {queue} is"

    async def _redrive(
        self, asked: _Asked, dead: DeadLetter, why: str, result: partial[RedriveResult]
    ) -> RedriveResult:
        id, queue, msg = dead.offset, dead.queue, asked.msg
        try:
            audit = await self._audit(
                asked, "allowed", f"dead letter {id} back into {queue}: {why}", dead
            )
        except Unavailable as exc:
            return result(outcome="refused", reason=f"not redriven: {exc}", refusal="not sent")
        try:
            await self.gateway.transport.publish("", queue, redrive_copy(dead), mandatory=True)
        except PublishError as exc:
            failure = (
                f"{queue} is gone"
                if isinstance(exc, Unroutable)
                else f"the broker did not confirm it ({exc}); it may have arrived"
            )
            try:
                audit = await self._audit(
                    asked, "denied", f"dead letter {id} not redriven: {failure}", dead
                )
            except Unavailable as unavailable:
                logger.error("failed redrive of dead letter %d not audited: %s", id, unavailable)
            return result(
                outcome="refused",
                reason=f"not redriven: {failure}",
                audit=audit,
                refusal="not sent",
            )
        mark = RedriveMark(
            time=time.time(),
            user=msg.user_id,
            agent=msg.app_id,
            queue=queue,
            audit=audit,
            on_behalf_of=asked.asker if asked.delegated_by else None,
        )
        logger.info("dead letter %d redriven into %s for %s (%s)", id, queue, msg.app_id, why)
        try:
            await self.marks.mark(id, mark)
        except REDIS_DOWN as exc:
            logger.error("dead letter %d redriven but not marked (Redis: %s)", id, exc)
            why = f"{why}; not marked redriven (Redis: {exc})"
        return result(outcome="redriven", reason=why, audit=audit)

    async def _audit(
        self, asked: _Asked, decision: Decision, reason: str, dead: DeadLetter | None = None
    ) -> str | None:
        """Record a decision on ``dead`` (on the request itself without one)."""
        msg = asked.msg
        record = AuditRecord(
            decision=decision,
            stage=STAGE,
            reason=reason,
            principal=asked.asker,
            delegated_by=asked.delegated_by,
            user=msg.user_id,
            agent=msg.app_id,
            instance=msg.instance,
            type=msg.type.value if dead is None else dead.type,
            topic=topology.request_key(self.gateway.id, REDRIVE) if dead is None else dead.topic,
            message_id=msg.message_id if dead is None else dead.message_id,
            correlation_id=msg.correlation_id,
            payload_sha256=None if dead is None else payload_sha256(dead.incoming.body),
        )
        return await self.trail.keep(record)
