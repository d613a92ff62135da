"""Authorization events for the rest of the platform: the pure builders of the outbox rows.

What lives here: the event types, ``OutboxEvent`` (one row of a backend's ``events`` table,
the transactional outbox) and the functions that build an event's payload from what a
backend already holds inside the transaction that commits a decision: the intent, the plan
or outcome and the journal id. Every backend (SQLite, PostgreSQL, the in-memory store)
writes the row these functions return in the SAME transaction as the journal row, so an
event exists if and only if its decision committed.

What does not: writing rows (each backend), publishing them (``switch.relay``), the JSON
Schema (``config/events/authorization-event.v1.schema.json``, which the tests hold every
emitted event to).

Card data: a payload carries the masked PAN (first six, last four) and ids, never a PAN, a
PIN block, a CVV, track data or a cryptogram. The builders take only the store's records,
which hold none of these (``switch.store.models``), and a card change names the attributes
that changed, never their values.

A payload is a flat JSON object (``schema``, ``schema_version``, ``event_id``, ``type``,
``occurred_at``, ids, ``masked_pan``, the four amounts, ``currency``, ``mti``,
``response_code``, ``reason``, ``approved``, ``stand_in``, ...). The relay adds
``sequence``, the row's position in the outbox, when it publishes: increasing in commit
order, so a consumer can order what it received of one account.
"""

from __future__ import annotations

import hashlib
import json
import string
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from switch.decisions import Reason
from switch.store.models import (
    APPROVING_REASONS,
    AuthIntent,
    CardChange,
    HoldRelease,
    ReversalIntent,
)

#: Name and version of the payload format (``config/events/authorization-event.v1...``).
SCHEMA_NAME: Final = "cardswitch.authorization-event"
SCHEMA_VERSION: Final = 1
#: What happened. ``authorization``: an 0100/0200 approved or declined (a duplicate
#: transmission included); ``advice``: an 0120/0220 applied or recorded; ``completion``: an
#: advice that converted a pre-authorization's hold into a debit; ``reversal``: an
#: 0400/0420 acknowledged (matched or not); ``hold_released``: a hold given back by expiry or
#: an operator; ``card_changed``: a card's attributes changed by an operator or an import.
EventType = Literal[
    "authorization", "advice", "completion", "reversal", "hold_released", "card_changed"
]
EVENT_TYPES: Final[tuple[str, ...]] = (
    "authorization", "advice", "completion", "reversal", "hold_released", "card_changed",
)  # fmt: skip
#: The message group of an event with neither an account nor a card.
NO_GROUP: Final = "none"
#: What SQS admits in a MessageGroupId.
_GROUP_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)
_GROUP_MAX = 128
#: Auth kinds that are advices.
_ADVICE_KINDS = frozenset({"advice_hold", "advice_debit", "advice_decline"})


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as a backend writes it into its outbox, in the decision's transaction."""

    event_id: str
    type: str
    #: The ordering key of the event (SQS MessageGroupId): account id, else card id, else
    #: ``NO_GROUP``.
    group_key: str
    journal_id: int | None
    created_at: str
    #: The payload without ``sequence`` (the relay adds it), as compact JSON.
    payload: str


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One stored outbox row, as the relay and the CLI read it."""

    #: Position in the outbox: increasing in commit order (the ``sequence`` published).
    id: int
    event_id: str
    type: str
    group_key: str
    journal_id: int | None
    created_at: str
    payload: str
    published_at: str | None = None
    attempts: int = 0
    parked_at: str | None = None
    last_error: str | None = None

    def body(self) -> str:
        """The message body published: the payload with its ``sequence``."""
        data = json.loads(self.payload)
        data["sequence"] = self.id
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What the relay's gauges show: rows waiting, the oldest of them, rows parked."""

    pending: int
    oldest_pending_at: str | None
    parked: int


@dataclass(frozen=True, slots=True)
class EventFailure:
    """A row SQS did not take: why, and whether it can never be taken (``poison``: SQS
    rejected the message itself, a sender fault), which parks it at once."""

    id: int
    error: str
    poison: bool = False


def new_event_id() -> str:
    """A fresh event id (UUID 4): the SQS MessageDeduplicationId and the consumers' key."""
    return str(uuid.uuid4())


def now_iso() -> str:
    """The current UTC time as the outbox stamps it."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def group_of(account_id: str | None, card_id: str | None) -> str:
    """The message group: account id, else card id, else ``NO_GROUP``; an id SQS would
    refuse as a MessageGroupId (over 128 characters, or characters other than ASCII letters,
    digits and punctuation) is replaced by its SHA-256, so no event is poison for its id.

    >>> group_of("acct-1", "card-1"), group_of(None, "card-1"), group_of(None, None)
    ('acct-1', 'card-1', 'none')
    >>> group_of("compte épargne", None)[:10]
    'sha256-ebd'
    """
    key = account_id or card_id or NO_GROUP
    if len(key) <= _GROUP_MAX and all(ch in _GROUP_CHARS for ch in key):
        return key
    return "sha256-" + hashlib.sha256(key.encode()).hexdigest()


def _event(
    type_: EventType,
    *,
    event_id: str,
    at: str,
    journal_id: int | None,
    card_id: str | None,
    account_id: str | None,
    fields: Mapping[str, Any],
) -> NewEvent:
    payload: dict[str, Any] = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "event_id": event_id,
        "type": type_,
        "occurred_at": at,
        "journal_id": journal_id,
        "card_id": card_id,
        "account_id": account_id,
        **fields,
    }
    return NewEvent(
        event_id=event_id,
        type=type_,
        group_key=group_of(account_id, card_id),
        journal_id=journal_id,
        created_at=at,
        payload=json.dumps(payload, sort_keys=True, separators=(",", ":")),
    )


def _decision_fields(
    *,
    masked_pan: str,
    amount: int,
    held: int,
    debited: int,
    released: int,
    currency: str,
    mti: str,
    response_code: str,
    reason: Reason,
    stand_in: bool,
    network: str,
    stan: str,
    rrn: str,
    transmission_time: str,
) -> dict[str, Any]:
    return {
        "masked_pan": masked_pan,
        "amount": amount,
        "held": held,
        "debited": debited,
        "released": released,
        "currency": currency,
        "mti": mti,
        "response_code": response_code,
        "reason": reason.value,
        "approved": reason in APPROVING_REASONS,
        "stand_in": stand_in,
        "network": network,
        "stan": stan,
        "rrn": rrn,
        "transmission_time": transmission_time,
    }


def auth_event(
    intent: AuthIntent,
    *,
    journal_id: int,
    reason: Reason,
    response_code: str,
    held: int,
    debited: int,
    released: int,
    at: str,
    event_id: str,
) -> NewEvent:
    """The event of a committed authorization, advice or completion (not of a replay).

    Args:
        intent: what the pipeline asked to commit.
        journal_id: the journal row just written.
        reason, response_code: what the plan decided and the DE39 journaled.
        held, debited: what this request's own money row reserved or debited.
        released: what a completion gave back of its pre-authorization's hold.
        at: the journal row's ``created_at``.
        event_id: ``new_event_id()``.
    """
    if reason is Reason.COMPLETION_APPLIED:
        type_: EventType = "completion"
    elif intent.kind in _ADVICE_KINDS:
        type_ = "advice"
    else:
        type_ = "authorization"
    key = intent.dup_key
    fields = _decision_fields(
        masked_pan=intent.masked_pan, amount=intent.amount, held=held, debited=debited,
        released=released, currency=intent.currency, mti=intent.mti,
        response_code=response_code, reason=reason, stand_in=intent.stand_in,
        network=key.network, stan=key.stan, rrn=key.rrn,
        transmission_time=key.transmission_time,
    )  # fmt: skip
    return _event(
        type_, event_id=event_id, at=at, journal_id=journal_id, card_id=intent.card_id,
        account_id=intent.account_id, fields=fields,
    )  # fmt: skip


def reversal_event(
    intent: ReversalIntent,
    *,
    journal_id: int,
    account_id: str | None,
    reason: Reason,
    response_code: str,
    released: int,
    original_journal_id: int | None,
    at: str,
    event_id: str,
) -> NewEvent:
    """The event of a committed reversal: what it gave back and which original it matched."""
    key = intent.dup_key
    fields = _decision_fields(
        masked_pan=intent.masked_pan, amount=intent.amount, held=0, debited=0,
        released=released, currency=intent.currency, mti=intent.mti,
        response_code=response_code, reason=reason, stand_in=intent.stand_in,
        network=key.network, stan=key.stan, rrn=key.rrn,
        transmission_time=key.transmission_time,
    )  # fmt: skip
    fields["original_journal_id"] = original_journal_id
    fields["replacement_amount"] = intent.replacement_amount
    return _event(
        "reversal", event_id=event_id, at=at, journal_id=journal_id, card_id=intent.card_id,
        account_id=account_id, fields=fields,
    )  # fmt: skip


def hold_release_event(
    release: HoldRelease,
    *,
    journal_id: int,
    card_id: str | None,
    currency: str,
    event_id: str,
) -> NewEvent:
    """The event of a hold given back without a reversal (``release.by``: ``expiry`` or the
    operator); ``journal_id`` is the authorization that took the hold."""
    fields = {
        "masked_pan": release.masked_pan,
        "amount": release.amount,
        "held": 0,
        "debited": 0,
        "released": release.amount,
        "currency": currency,
        "hold_id": release.hold_id,
        "released_by": release.by,
    }
    return _event(
        "hold_released", event_id=event_id, at=release.at, journal_id=journal_id,
        card_id=card_id, account_id=release.account_id, fields=fields,
    )  # fmt: skip


def card_change_event(change: CardChange, *, account_id: str, event_id: str) -> NewEvent:
    """The event of a card's maintenance: who changed which attributes (names only) and the
    new status when it changed."""
    fields: dict[str, Any] = {
        "masked_pan": change.masked_pan,
        "actor": change.actor,
        "changed_fields": sorted(change.changed),
    }
    status = change.changed.get("status")
    if status is not None:
        fields["status"] = str(status[1])
    return _event(
        "card_changed", event_id=event_id, at=change.at, journal_id=None,
        card_id=change.card_id, account_id=account_id, fields=fields,
    )  # fmt: skip
