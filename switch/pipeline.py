"""The authorization pipeline: from a typed request to a committed decision and its answer.

What lives here: ``Pipeline``, the ``Engine`` the dispatcher calls (handler.py). An
authorization runs small steps in order, each of which either passes or returns a ``Reason``:

    duplicate -> validate -> card -> status -> expiry -> security (CVV/iCVV, CVV2, ARQC, PIN)
    -> controls -> commit (journal + hold/debit + PIN tries + velocity + funds, one transaction)

and comes back as a ``Decision``: the response, the reason that decided it, the stand-in
cause when there is one, the money moved.

Budget and failure policy, the same for authorizations and reversals: everything up to and
including the hand-over to the store runs under the network's latency budget
(the profile's ``budget``, else ``pipeline.budget``,
counted from the moment the frame was read). If the budget runs out or
the HSM or the store fails before the store has taken the commit, the request is answered by
the stand-in policy (``pipeline.stand_in``, a Reason) and nothing is kept. Once the store has
taken the commit, the decision it returns is the answer sent, however long that took. A
repeat of a request already journaled is answered with its stored answer whatever the HSM
or the budget do afterwards (a chip repeat gets its ARPC when the HSM can give it in time,
and goes without DE55 otherwise). Advices (0120/0121/0220/0221) are applied and
acknowledged, never declined. Reversals are matched to their original through DE90.

What does not live here: field parsing (wire/), the money rules that must be atomic
(store/rules.py), the Reason-to-DE39 tables (decisions.py), cryptography (hsm/), sockets and
the log line of each request (server.py, from the returned ``Decision``).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import trio

from hsm.api import (
    ArpcGeneration,
    ArpcRequest,
    ArqcVerification,
    Cvn,
    CvvVerification,
    EmvCard,
    Hsm,
    Ibm3624Reference,
    PinBlockFormat,
    PinVerification,
    PvvReference,
)
from hsm.carddata import CardVault
from hsm.errors import HsmError, InvalidInput
from hsm.pan import mask_pan
from switch import metrics
from switch.breaker import Breaker, Permit
from switch.breaker import State as BreakerState
from switch.config import Config, ListenerConfig
from switch.decisions import Reason, check_controls
from switch.handler import Decision, RequestContext, StandInCause
from switch.log import get_logger
from switch.store.api import Store
from switch.store.models import (
    Account,
    AuthIntent,
    AuthKind,
    AuthLookup,
    AuthOutcome,
    Card,
    CardStatus,
    DuplicateKey,
    JournalRef,
    OriginalKey,
    PinCheck,
    ReversalIntent,
    ReversalOutcome,
    StoreError,
)
from switch.wire import emv
from switch.wire.messages import (
    AdditionalAmount,
    AuthRequest,
    AuthResponse,
    ReversalRequest,
    ReversalResponse,
    is_advice,
    is_financial,
)

log = get_logger("switch.pipeline")

#: Processing-code transaction types (DE3 positions 1-2) this issuer authorizes:
#: goods and services, cash, goods with cash back.
_SUPPORTED_TRANSACTION_TYPES = frozenset({"00", "01", "09"})
#: POS entry modes (DE22 positions 1-2) where track 2 was read from the chip (iCVV applies):
#: contact chip and contactless chip.
_CHIP_ENTRY_MODES = frozenset({"05", "07"})
#: Service code under which the iCVV of chip track-2-equivalent data is computed.
_ICVV_SERVICE_CODE = "999"
#: Service code under which the CVV2 printed on the card is computed.
_CVV2_SERVICE_CODE = "000"
#: Visa track 2 discretionary data layout: PVKI (1) and PVV (4) precede the 3-digit CVV.
_TRACK2_CVV_OFFSET = 5
_CVV_LENGTH = 3
#: Account type and currency layout of DE54: "00" default account, amount type "02" available.
_DE54_ACCOUNT_TYPE = "00"
_DE54_AVAILABLE = "02"
#: Authorization response codes the card sees in the ARPC: approve "00", decline "05".
_ARC_APPROVED = b"00"
_ARC_DECLINED = b"05"
#: Card status update of a CVN 18 ARPC (method 2): nothing to update on the card.
_CSU_NO_UPDATE = b"\x00\x00\x00\x00"
#: Card status update of a CVN 18 ARPC (method 2): byte 2 bit 8 set, "issuer approves".
_CSU_APPROVED = b"\x00\x80\x00\x00"
#: Seconds a post-commit ARPC computation may take; without it the answer goes without DE55.
_ARPC_TIMEOUT = 0.5
#: Issuer Authentication Data (ARPC || ARC or ARPC || CSU) in the response DE55.
_TAG_ISSUER_AUTH_DATA = 0x91


@dataclass(frozen=True, slots=True)
class _EmvContext:
    """What the post-commit ARPC needs: the card key, the ATC and the verified ARQC."""

    card: EmvCard
    atc: bytes
    arqc: bytes
    un: bytes


@dataclass(frozen=True, slots=True)
class _Prepared:
    """The pipeline's decision before commit: the intent and, for a chip request, what its
    ARPC needs once the store has decided."""

    intent: AuthIntent
    emv: _EmvContext | None = None
    #: Approved (if the store agrees) by the issuer stand-in policy, without the HSM.
    stand_in: bool = False


@dataclass(frozen=True, slots=True)
class _Security:
    """The result of the security step: the check that failed, or the PIN result and the
    verified EMV context to carry to commit."""

    failed: Reason | None
    pin_check: PinCheck | None = None
    emv: _EmvContext | None = None


class _Unavailable(Exception):
    """The HSM failed before commit: answer by the stand-in policy, keep nothing."""


class _Refused(Exception):
    """A dependency's circuit breaker is open: answer by the stand-in policy at once."""

    def __init__(self, dependency: str) -> None:
        super().__init__(f"{dependency} breaker open")
        self.dependency = dependency


#: The dependencies behind a circuit breaker: card-security commands, the store, and the
#: card-data vault (PAN fingerprints: the HSM's key, or KMS's).
DEPENDENCIES = ("hsm", "store", "vault")


class Pipeline:
    """The issuer's decision engine; implements ``switch.handler.RequestHandler``.

    Args:
        config: switch configuration (budget, stand-in code, listeners' key labels).
        store: the durable store.
        hsm: card-security commands.
        vault: PAN fingerprinting.
        clock: the current time, for expiry and velocity periods (tests pin it).
    """

    def __init__(
        self,
        config: Config,
        *,
        store: Store,
        hsm: Hsm,
        vault: CardVault,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._cfg = config
        self._store = store
        self._hsm = hsm
        self._vault = vault
        self._now: Callable[[], datetime] = clock or _utc_now
        self._stand_in_reason = Reason(config.pipeline.stand_in)
        pcfg = config.pipeline
        self.breakers: dict[str, Breaker] = {
            name: Breaker(
                name,
                threshold=pcfg.breaker_failures,
                cool_down=pcfg.breaker_cool_down,
                clock=trio.current_time,
                on_change=_breaker_changed,
            )
            for name in DEPENDENCIES
        }

    # -- dependency calls -------------------------------------------------------------------

    def _guard(self, dependency: str) -> _Guard:
        """One call (or a few back to back) to ``dependency`` under its circuit breaker
        (a context manager: see ``_Guard``)."""
        return _Guard(self.breakers[dependency])

    def _hsm_call(self, command: str, *, dependency: str = "hsm") -> _HsmCall:
        """One HSM (or vault) command: timed, its errors counted, under its breaker."""
        return _HsmCall(self.breakers[dependency], command)

    # -- authorizations ---------------------------------------------------------------------

    async def authorize(self, request: AuthRequest, context: RequestContext) -> Decision:
        dup_key = _duplicate_key(request, context)
        deadline = context.received_at + context.profile.budget_or(self._cfg.pipeline.budget)
        stored: AuthOutcome | ReversalOutcome | None = None
        prepared: _Prepared | None = None
        outcome: AuthOutcome | None = None
        try:
            with trio.move_on_at(deadline):
                fingerprint = await self._fingerprint(request.pan)
                digest = _auth_digest(request, dup_key, fingerprint)
                with _step("duplicate"), self._guard("store"):
                    # The repeat check and the card's reads in one store operation.
                    lookup = await self._store.lookup_auth(dup_key, digest, fingerprint)
                stored = lookup.stored
                if stored is None:
                    prepared = await self._prepare(request, context, dup_key, digest, lookup)
                    with _step("commit"), self._guard("store"):
                        outcome = await self._store.commit_auth(prepared.intent, deadline=deadline)
        except (_Unavailable, _Refused, StoreError, HsmError) as exc:
            if isinstance(exc, StoreError):  # its message carries no card data (contract)
                log.error("store_failed", mti=request.mti, stan=request.stan, error=str(exc))
            return self._stand_in(request, context, _cause(exc))
        if isinstance(stored, AuthOutcome):
            return await self._replay(request, stored, fingerprint, deadline)
        if stored is not None:  # the key of a reversal: the acquirer reused its identifiers
            return self._stand_in(request, context, "store")
        if outcome is None:
            return self._stand_in(request, context, "budget")
        assert prepared is not None
        issuer_auth = None
        if prepared.emv is not None:
            issuer_auth = await self._arpc(
                prepared.emv, approved=outcome.approved, deadline=deadline
            )
        # The row this request wrote (a replay found in the commit wrote none).
        journal = None if outcome.replayed else JournalRef(dup_key, prepared.intent.digest)
        if prepared.stand_in:
            if outcome.approved and not outcome.replayed:
                metrics.observe_stand_in_approval(context.network)
            return replace(_decision(request, outcome, None, journal), stand_in="hsm")
        return _decision(request, outcome, issuer_auth, journal)

    async def _replay(
        self, request: AuthRequest, stored: AuthOutcome, fingerprint: bytes, deadline: float
    ) -> Decision:
        """The stored answer of a repeated request; its ARPC again for a chip request.

        Never a stand-in: the answer was committed, so it is the answer. Cryptograms are not
        stored, so the ARQC is verified again for the ARPC; when the HSM cannot do that in
        time (``_ARPC_TIMEOUT``, and within the budget) the answer goes without DE55.
        """
        issuer_auth = None
        if request.emv is not None:
            try:
                with trio.move_on_at(min(trio.current_time() + _ARPC_TIMEOUT, deadline)):
                    issuer_auth = await self._replayed_arpc(request, stored, fingerprint, deadline)
            except (HsmError, StoreError, _Refused) as exc:
                log.warning("replay_arpc_failed", error=type(exc).__name__)
        return _decision(request, stored, issuer_auth)

    def _stand_in(
        self, request: AuthRequest, context: RequestContext, cause: StandInCause
    ) -> Decision:
        """The stand-in policy's answer: nothing was committed and nothing is kept."""
        reason = self._stand_in_reason
        response = AuthResponse.answer(request, context.profile.code(reason))
        return Decision(response, reason, stand_in=cause, masked_pan=mask_pan(request.pan))

    async def _prepare(
        self,
        req: AuthRequest,
        ctx: RequestContext,
        dup_key: DuplicateKey,
        digest: str,
        lookup: AuthLookup,
    ) -> _Prepared:
        """The steps before commit: what the store is to make durable for this request,
        from the card and account ``lookup`` read."""
        advice = is_advice(req.mti)
        completion = advice and _is_completion(req, ctx.listener)
        financial = is_financial(req.mti) or completion
        kind: AuthKind
        if advice:
            kind = "advice_debit" if financial else "advice_hold"
        else:
            kind = "debit" if financial else "hold"
        now = self._now()
        # Every outcome of this request is this intent with some fields replaced.
        base = AuthIntent(
            dup_key=dup_key,
            digest=digest,
            mti=req.mti,
            card_id=None,
            account_id=None,
            masked_pan=mask_pan(req.pan),
            amount=req.amount,
            currency=req.currency,
            kind="advice_decline" if advice else "decline",
            profile=ctx.profile,
            approval_code=_approval_code(),
            velocity_day=now.strftime("%Y%m%d"),
            velocity_month=now.strftime("%Y%m"),
            original=_advice_original(req, ctx, completion=completion) if advice else None,
            hold_expires_at=(now + timedelta(days=self._cfg.holds.days_for(req.mcc))).isoformat(
                timespec="seconds"
            ),
            keep_rest_on_partial_completion=ctx.listener.completion_keeps_rest,
            atc_window=self._cfg.pipeline.atc_window,
            stand_in=advice,
        )

        #: The chip counter once the cryptogram is verified: journaled with any outcome.
        atc: int | None = None

        def decline(
            reason: Reason, card: Card | None = None, pin_check: PinCheck | None = None
        ) -> _Prepared:
            return _Prepared(
                replace(
                    base,
                    card_id=card.id if card else None,
                    account_id=card.account_id if card else None,
                    decline_reason=reason,
                    pin_check=pin_check,
                    atc=atc,
                )
            )

        if not advice:
            with _step("validate"):
                reason = _validate(req)
            if reason is not None:
                return decline(reason)

        card, account = lookup.card, lookup.account
        if card is None or account is None:
            return decline(Reason.ADVICE_UNKNOWN_CARD if advice else Reason.UNKNOWN_CARD)
        if account.currency != req.currency:
            # No conversion here: the account is debited in its own currency only. The
            # decline is journaled without the account (no balance in another currency).
            return decline(
                Reason.ADVICE_WRONG_CURRENCY if advice else Reason.CURRENCY_NOT_SUPPORTED
            )

        if advice:
            # The network already answered the cardholder. What it approved is applied
            # whatever our own rules say; what it declined is recorded and moves no money.
            if req.response_code not in (None, ctx.profile.code(Reason.APPROVED)):
                return decline(Reason.ADVICE_OF_DECLINE, card)
            return _Prepared(replace(base, card_id=card.id, account_id=card.account_id, kind=kind))

        reason = _status_and_expiry(card, req, now) or _entry_mode(req, card, ctx.listener)
        if reason is not None:
            return decline(reason, card)

        try:
            with _step("security"):
                security = await self._security(req, card, ctx.listener, ctx.zpk)
        except (_Unavailable, _Refused) as exc:
            if isinstance(exc, _Refused) and exc.dependency != "hsm":  # pragma: no cover
                raise
            offline = self._stand_in_approval(req, card, ctx.listener, base, kind)
            if offline is None:
                raise
            return offline
        if security.failed is not None:
            return decline(security.failed, card, pin_check=security.pin_check)
        atc = None if security.emv is None else int.from_bytes(security.emv.atc, "big")

        with _step("controls"):
            reason = check_controls(card.controls, req.amount, req.mcc, _countries(req))
        if reason is not None:
            return decline(reason, card, pin_check=security.pin_check)

        intent = replace(
            base,
            card_id=card.id,
            account_id=card.account_id,
            kind=kind,
            pin_check=security.pin_check,
            atc=atc,
            velocity=card.controls if card.controls.has_velocity else None,
        )
        return _Prepared(intent, security.emv)

    def _stand_in_approval(
        self,
        req: AuthRequest,
        card: Card,
        listener: ListenerConfig,
        base: AuthIntent,
        kind: AuthKind,
    ) -> _Prepared | None:
        """The intent of an approval by the listener's ``approve_low_risk`` stand-in policy,
        or ``None`` (the stand-in decline): the HSM cannot check the card, which is active
        and unexpired (checked before), presents no PIN or CVV2 (neither can be checked
        offline), asks at most ``stand_in_max_amount`` and passes the spend controls. The
        store still decides velocity, funds and the card's daily stand-in allowance in the
        normal commit; the journal row is flagged ``stand_in`` and carries the hold.
        """
        if listener.stand_in != "approve_low_risk":
            return None
        if req.pin_block is not None or req.cvv2 is not None:
            return None
        if req.amount > listener.stand_in_max_amount:
            return None
        if check_controls(card.controls, req.amount, req.mcc, _countries(req)) is not None:
            return None
        intent = replace(
            base,
            card_id=card.id,
            account_id=card.account_id,
            kind=kind,
            velocity=card.controls if card.controls.has_velocity else None,
            stand_in=True,
            stand_in_daily=listener.stand_in_daily_amount or None,
            decline_reason=self._stand_in_reason,
        )
        return _Prepared(intent, None, stand_in=True)

    async def _security(
        self, req: AuthRequest, card: Card, listener: ListenerConfig, zpk: str
    ) -> _Security:
        """CVV/iCVV from track 2, CVV2 from DE48, ARQC from DE55, PIN from DE52, in order.

        Data the HSM rejects as malformed (``InvalidInput``: a CVV with letters, a PIN block
        that does not decipher to a PIN) fails the check it was offered to; an HSM that
        cannot answer makes the whole request unanswerable (stand-in, nothing kept).
        """
        try:
            failed = await self._check_track2(req, card)
            if failed is None:
                failed = await self._check_cvv2(req, card)
            emv_ctx = None
            if failed is None and req.emv is not None and card.imk_ac and card.emv_cvn:
                failed, emv_ctx = await self._check_arqc(req, card)
            if failed is not None:
                return _Security(failed)
            pin_check = await self._check_pin(req, card, listener, zpk)
            return _Security(None, pin_check, emv_ctx)
        except HsmError as exc:
            if isinstance(exc, InvalidInput):  # pragma: no cover - each check maps its own
                raise
            raise _Unavailable(type(exc).__name__) from exc

    async def _check_track2(self, req: AuthRequest, card: Card) -> Reason | None:
        """The CVV of magnetic-stripe track 2, or the iCVV of chip track-2-equivalent data."""
        if req.track2 is None or not card.cvk:
            return None
        chip = (req.pos_entry_mode or "")[:2] in _CHIP_ENTRY_MODES
        failing = Reason.ICVV_MISMATCH if chip else Reason.CVV_MISMATCH
        disc = req.track2.discretionary
        cvv = disc[_TRACK2_CVV_OFFSET : _TRACK2_CVV_OFFSET + _CVV_LENGTH]
        service = _ICVV_SERVICE_CODE if chip else req.track2.service_code
        try:
            with self._hsm_call("verify_cvv"):
                result = await self._hsm.verify_cvv(
                    CvvVerification(card.cvk, req.pan, req.track2.expiry, service, cvv)
                )
        except InvalidInput:
            return failing
        return None if result.ok else failing

    async def _check_cvv2(self, req: AuthRequest, card: Card) -> Reason | None:
        """The CVV2 printed on the card (card-not-present)."""
        if req.cvv2 is None or not card.cvk:
            return None
        expiry = req.expiry or card.expiry
        try:
            with self._hsm_call("verify_cvv2"):
                result = await self._hsm.verify_cvv(
                    CvvVerification(card.cvk, req.pan, expiry, _CVV2_SERVICE_CODE, req.cvv2)
                )
        except InvalidInput:
            return Reason.CVV2_MISMATCH
        return None if result.ok else Reason.CVV2_MISMATCH

    async def _check_pin(
        self, req: AuthRequest, card: Card, listener: ListenerConfig, zpk: str
    ) -> PinCheck | None:
        """The PIN result the store's rules count: ``None`` when no PIN was entered.

        ``zpk`` is the key in force when the request was read (``RequestContext.zpk``): a
        key exchange meanwhile does not change the key a request in flight is verified with.

        A card already at its try limit is not verified again: the rules answer it
        ``PIN_TRIES_EXCEEDED`` without counting.
        """
        if req.pin_block is None:
            return None
        if card.pin_tries >= card.pin_try_limit:
            return "bad"
        if card.pvk is None or card.pin_method is None or not card.pin_verification_value:
            return "bad"  # a PIN was entered but the card has no PIN to check it against
        reference: PvvReference | Ibm3624Reference
        if card.pin_method == "pvv":
            reference = PvvReference(
                pvk=card.pvk, pvki=card.pvki or "1", pvv=card.pin_verification_value
            )
        else:
            reference = Ibm3624Reference(
                pvk=card.pvk,
                offset=card.pin_verification_value,
                dec_table=card.ibm_dec_table or "",
                validation_data=card.ibm_validation_data or "",
            )
        try:
            with self._hsm_call("verify_pin"):
                result = await self._hsm.verify_pin(
                    PinVerification(
                        zpk=zpk,
                        pin_block=req.pin_block,
                        format=PinBlockFormat(listener.pin_block_format),
                        pan=req.pan,
                        reference=reference,
                    )
                )
        except InvalidInput:
            return "bad"  # a block that is no PIN block counts as a wrong PIN
        return "ok" if result.ok else "bad"

    async def _check_arqc(
        self, req: AuthRequest, card: Card
    ) -> tuple[Reason | None, _EmvContext | None]:
        """The chip cryptogram: it must cover this message and verify.

        The data elements the terminal put under the ARQC that the network also sends in
        clear (amount, currency, country, date, transaction type) must equal the ISO fields,
        or a valid cryptogram of another transaction would approve this one
        (``EMV_DATA_MISMATCH``); then the HSM verifies it (``ARQC_FAILED``).
        """
        try:
            tlv = emv.TlvMap.from_bytes(req.emv or b"")
        except emv.EmvFormatError:
            return Reason.ARQC_FAILED, None
        if not _chip_data_matches(tlv, req):
            return Reason.EMV_DATA_MISMATCH, None
        emv_ctx = await self._verify_arqc(req, card, tlv)
        return (Reason.ARQC_FAILED, None) if emv_ctx is None else (None, emv_ctx)

    async def _verify_arqc(
        self, req: AuthRequest, card: Card, tlv: emv.TlvMap | None = None
    ) -> _EmvContext | None:
        """The verified EMV context, or None when the ARQC is absent, malformed or wrong."""
        assert req.emv is not None and card.imk_ac and card.emv_cvn
        try:
            if tlv is None:
                tlv = emv.TlvMap.from_bytes(req.emv)
            emv_card = EmvCard(
                imk=card.imk_ac,
                cvn=Cvn(card.emv_cvn),
                pan=req.pan,
                psn=req.pan_sequence or card.pan_sequence,
            )
            verification = ArqcVerification.from_tags(
                emv_card, {f"{tag:X}": value for tag, value in tlv.items()}
            )
        except (emv.EmvFormatError, InvalidInput, ValueError):
            return None  # no usable cryptogram: a chip transaction that cannot be verified
        with self._hsm_call("verify_arqc"):
            result = await self._hsm.verify_arqc(verification)
        if not result.ok:
            return None
        return _EmvContext(emv_card, verification.atc, verification.arqc, verification.un)

    async def _fingerprint(self, pan: str) -> bytes:
        """The keyed PAN fingerprint: computed once per request, for the digest and lookup."""
        with self._hsm_call("fingerprint", dependency="vault"):
            return await self._vault.fingerprint(pan)

    async def _replayed_arpc(
        self, request: AuthRequest, stored: AuthOutcome, fingerprint: bytes, deadline: float
    ) -> bytes | None:
        """The ARPC of a repeated chip request: the card needs it as much as the first time.

        Cryptograms are never stored, so the ARQC is verified again and the ARPC computed for
        the stored decision; when that is not possible the answer goes without DE55.
        """
        if request.emv is None:
            return None
        with self._guard("store"):
            card = await self._store.get_card_by_fingerprint(fingerprint)
        if card is None or not card.imk_ac or not card.emv_cvn:
            return None
        emv_ctx = await self._verify_arqc(request, card)
        if emv_ctx is None:
            return None
        return await self._arpc(emv_ctx, approved=stored.approved, deadline=deadline)

    async def _arpc(self, ctx: _EmvContext, *, approved: bool, deadline: float) -> bytes | None:
        """Issuer authentication data (tag 91) for the card: ARPC with ARC or CSU; ``None``
        when the HSM cannot give it within ``_ARPC_TIMEOUT`` and the request's budget (the
        committed answer then goes without DE55, in time)."""
        if ctx.card.cvn is Cvn.VISA_18:
            csu = _CSU_APPROVED if approved else _CSU_NO_UPDATE
            arpc_req = ArpcRequest(csu=csu)
            suffix = csu
        else:
            arc = _ARC_APPROVED if approved else _ARC_DECLINED
            arpc_req = ArpcRequest(arc=arc)
            suffix = arc
        try:
            limit = min(trio.current_time() + _ARPC_TIMEOUT, deadline)
            with trio.fail_at(limit), self._hsm_call("generate_arpc"):
                arpc = await self._hsm.generate_arpc(
                    ArpcGeneration(
                        card=ctx.card, atc=ctx.atc, arqc=ctx.arqc, arpc=arpc_req, un=ctx.un
                    )
                )
        except (HsmError, trio.TooSlowError, _Refused) as exc:
            log.warning("arpc_failed", error=type(exc).__name__)
            return None
        return arpc + suffix

    # -- reversals --------------------------------------------------------------------------

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> Decision:
        """Release what remains of the original's hold (or credit back its debit), once.

        The original is named as a duplicate key (DE90 plus the reversal's DE37/DE41 where the
        profile matches on them) and must be of the reversal's card and currency.
        """
        dup_key = _duplicate_key(request, context)
        masked = mask_pan(request.pan) if request.pan else None
        outcome: ReversalOutcome | None = None
        cause: StandInCause = "budget"
        deadline = context.received_at + context.profile.budget_or(self._cfg.pipeline.budget)
        try:
            with trio.move_on_at(deadline):
                fingerprint = b""
                card_id = None
                if request.pan:
                    fingerprint = await self._fingerprint(request.pan)
                    with self._guard("store"):
                        card = await self._store.get_card_by_fingerprint(fingerprint)
                    card_id = None if card is None else card.id
                intent = ReversalIntent(
                    dup_key=dup_key,
                    digest=_reversal_digest(request, dup_key, fingerprint),
                    original_key=_reversal_original(request, context),
                    card_id=card_id,
                    pan_present=bool(request.pan),
                    mti=request.mti,
                    amount=request.amount,
                    replacement_amount=request.replacement_amount or None,
                    currency=request.currency or "",
                    masked_pan=masked or "",
                    profile=context.profile,
                    stand_in=is_advice(request.mti),  # 0420/0421: reversed in our place
                )
                with _step("commit"), self._guard("store"):
                    outcome = await self._store.commit_reversal(intent, deadline=deadline)
        except (StoreError, HsmError, _Refused) as exc:
            if isinstance(exc, StoreError):  # its message carries no card data (contract)
                log.error("store_failed", mti=request.mti, stan=request.stan, error=str(exc))
            cause = _cause(exc)
        if outcome is None:
            # Not taken by the store: nothing kept. The network repeats a reversal until it
            # is acknowledged, so the stand-in decline loses nothing.
            reason = self._stand_in_reason
            code = context.profile.code(reason)
            return Decision(
                ReversalResponse.answer(request, code), reason, stand_in=cause, masked_pan=masked
            )
        return Decision(
            ReversalResponse.answer(request, outcome.response_code),
            outcome.reason,
            replayed=outcome.replayed,
            released=outcome.released_amount,
            masked_pan=masked,
            journal=None if outcome.replayed else JournalRef(dup_key, intent.digest),
        )


# -- pure helpers -------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _validate(req: AuthRequest) -> Reason | None:
    """Field rules beyond the codec's format checks.

    The Luhn check digit is not checked here: an unknown PAN is declined 14 by the card
    lookup, and the published test-vector PANs the demo cards use are not Luhn-valid.
    """
    if req.processing_code[:2] not in _SUPPORTED_TRANSACTION_TYPES:
        return Reason.INVALID_TRANSACTION
    if req.amount == 0 and is_financial(req.mti):
        # A zero 0100 is an account verification (approved without a hold when the card
        # checks pass); a zero financial request moves nothing and is not one.
        return Reason.INVALID_AMOUNT
    return None


#: Card statuses that decline, with their reason.
_STATUS_REASONS = {
    CardStatus.LOST: Reason.LOST_CARD,
    CardStatus.STOLEN: Reason.STOLEN_CARD,
    CardStatus.BLOCKED: Reason.CARD_BLOCKED,
    CardStatus.CLOSED: Reason.CARD_CLOSED,
}


def _status_and_expiry(card: Card, req: AuthRequest, now: datetime) -> Reason | None:
    reason = _STATUS_REASONS.get(card.status)
    if reason is not None:
        return reason
    presented = req.expiry or (req.track2.expiry if req.track2 else None)
    if presented is not None and presented != card.expiry:
        return Reason.EXPIRED_CARD
    if card.expiry < now.strftime("%y%m"):
        return Reason.EXPIRED_CARD
    return None


def _countries(req: AuthRequest) -> tuple[str, ...]:
    merchant_country = req.merchant_location.country if req.merchant_location else None
    return tuple(c for c in (req.acquirer_country, merchant_country) if c)


def _approval_code() -> str:
    """A random 6-digit DE38 approval code."""
    return f"{secrets.randbelow(1_000_000):06d}"


def _duplicate_key(req: AuthRequest | ReversalRequest, ctx: RequestContext) -> DuplicateKey:
    """Network, acquirer (DE32), DE7, DE11, DE37, DE41 and MTI class: unique in the journal."""
    return DuplicateKey(
        network=ctx.network,
        acquirer_id=req.acquirer_id or "",
        transmission_time=req.transmission_time,
        stan=req.stan,
        rrn=req.rrn or "",
        terminal_id=req.terminal_id or "",
        mti_class=req.mti,
    )


def _digest(*parts: object) -> str:
    """A hash of what defines a request, for telling a repeat from a reused key."""
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _auth_digest(req: AuthRequest, key: DuplicateKey, fingerprint: bytes) -> str:
    """MTI class, processing code, amount, currency and the card (by its PAN fingerprint)."""
    return _digest(key.mti_class, req.processing_code, req.amount, req.currency, fingerprint.hex())


def _reversal_digest(req: ReversalRequest, key: DuplicateKey, fingerprint: bytes) -> str:
    """What a reversal reverses: the original, the amounts, currency and card."""
    o = req.original
    return _digest(
        key.mti_class, req.amount, req.replacement_amount or "", req.currency or "",
        fingerprint.hex(), o.mti, o.stan, o.transmission_time, o.acquirer_id,
    )  # fmt: skip


def _reversal_original(req: ReversalRequest, ctx: RequestContext) -> OriginalKey:
    """The key of the original a reversal names: DE90, plus DE37/DE41 per the profile."""
    o = req.original
    match = ctx.profile.original_match_rrn_terminal
    return OriginalKey(
        network=ctx.network,
        acquirer_id=o.acquirer_id,
        transmission_time=o.transmission_time,
        stan=o.stan,
        mti_class=o.mti,
        rrn=(req.rrn or "") if match else None,
        terminal_id=(req.terminal_id or "") if match else None,
    )


#: The MTI class an advice repeats: 0120/0121 the 0100, 0220/0221 the 0200.
_ADVISED_CLASS = {"012": "010", "022": "020"}


def _is_completion(req: AuthRequest, listener: ListenerConfig) -> bool:
    """Whether an advice completes the pre-authorization its DE90 names: it carries DE90 and
    its MTI class (0220/0221, 0120/0121) is one of the listener's ``completion_mtis``."""
    return req.original is not None and any(
        req.mti[:3] == mti[:3] for mti in listener.completion_mtis
    )


def _advice_original(req: AuthRequest, ctx: RequestContext, *, completion: bool) -> OriginalKey:
    """The authorization an advice repeats, or, for a completion (``_is_completion``), the
    pre-authorization DE90 names. An 0120 not listed as a completion repeats what its DE90
    names (else its own key in class 010); a financial advice (0220) not listed names its
    own 0200, DE90 aside: it converts what it names, never adds."""
    match = ctx.profile.original_match_rrn_terminal
    rrn = (req.rrn or "") if match else None
    terminal = (req.terminal_id or "") if match else None
    if req.original is not None and (completion or not is_financial(req.mti)):
        o = req.original
        return OriginalKey(ctx.network, o.acquirer_id, o.transmission_time, o.stan, o.mti,
                           rrn, terminal)  # fmt: skip
    key = _duplicate_key(req, ctx)
    return OriginalKey(
        ctx.network, key.acquirer_id, key.transmission_time, key.stan,
        _ADVISED_CLASS.get(key.mti_class, key.mti_class), rrn, terminal,
    )  # fmt: skip


#: POS entry modes (DE22 positions 1-2) of a magnetic-stripe read: fallback from chip
#: (80) and full track read (90).
_MAGSTRIPE_ENTRY_MODES = frozenset({"80", "90"})
#: Service-code first digits of a chip card (ISO/IEC 7813): international and national.
_CHIP_SERVICE_CODES = frozenset({"2", "6"})


def _entry_mode(req: AuthRequest, card: Card, listener: ListenerConfig) -> Reason | None:
    """Chip entry must carry chip data; a chip card read by its stripe is a fallback. Each
    declines unless the listener's network rule allows it."""
    mode = (req.pos_entry_mode or "")[:2]
    if mode in _CHIP_ENTRY_MODES and req.emv is None:
        return None if listener.chip_without_emv == "allow" else Reason.CHIP_DATA_MISSING
    service = req.track2.service_code if req.track2 else card.service_code
    if mode in _MAGSTRIPE_ENTRY_MODES and service[:1] in _CHIP_SERVICE_CODES:
        return None if listener.chip_fallback == "allow" else Reason.CHIP_FALLBACK
    return None


_TAG_AMOUNT = 0x9F02
_TAG_CURRENCY = 0x5F2A
_TAG_COUNTRY = 0x9F1A
_TAG_DATE = 0x9A
_TAG_TYPE = 0x9C


def _chip_data_matches(tlv: emv.TlvMap, req: AuthRequest) -> bool:
    """Whether the chip data under the cryptogram agrees with the clear ISO fields: 9F02 with
    DE4, 5F2A with DE49, 9F1A with DE19, 9A (YYMMDD) with DE13 (MMDD), 9C with DE3 1-2.
    A value absent on either side is not compared (the ARQC covers what the card put in).
    """
    pairs: list[tuple[int, str | None, Callable[[str], str]]] = [
        (_TAG_AMOUNT, str(req.amount), lambda h: str(int(h))),
        (_TAG_CURRENCY, req.currency, lambda h: h[-3:]),
        (_TAG_COUNTRY, req.acquirer_country, lambda h: h[-3:]),
        (_TAG_DATE, req.local_date, lambda h: h[2:6]),
        (_TAG_TYPE, req.processing_code[:2], lambda h: h),
    ]
    for tag, clear, read in pairs:
        value = tlv.get(tag)
        if value is None or clear is None:
            continue
        text = value.hex()
        if not text.isdigit() or read(text) != clear:
            return False
    return True


def _cause(exc: BaseException) -> StandInCause:
    """Which dependency kept the pipeline from deciding (the vault's key is the HSM's or
    KMS's: "hsm")."""
    if isinstance(exc, _Refused):
        return "store" if exc.dependency == "store" else "hsm"
    return "store" if isinstance(exc, StoreError) else "hsm"


def _decision(
    request: AuthRequest,
    outcome: AuthOutcome,
    issuer_auth: bytes | None,
    journal: JournalRef | None = None,
) -> Decision:
    """The answer for a committed (or replayed) outcome: its journaled DE39, approval code,
    available balance (DE54), for a chip request the issuer authentication data, and the
    journal row it was written to (``journal``: None for a replay)."""
    balance = None
    # A balance DE54 cannot carry (13+ digits) is left out rather than sent wrong.
    if outcome.available_balance is not None and AdditionalAmount.fits(outcome.available_balance):
        balance = AdditionalAmount(
            account_type=_DE54_ACCOUNT_TYPE,
            amount_type=_DE54_AVAILABLE,
            currency=outcome.currency,
            amount=outcome.available_balance,
        )
    response = AuthResponse.answer(
        request,
        outcome.response_code,
        approval_code=outcome.approval_code if outcome.approved else None,
        available_balance=balance,
        emv=emv.build([(_TAG_ISSUER_AUTH_DATA, issuer_auth)]) if issuer_auth else None,
    )
    return Decision(
        response,
        outcome.reason,
        replayed=outcome.replayed,
        held=outcome.held,
        debited=outcome.debited,
        masked_pan=mask_pan(request.pan),
        journal=journal,
    )


def _breaker_changed(breaker: Breaker) -> None:
    state = breaker.state
    metrics.observe_breaker(breaker.name, int(state))
    emit = log.info if state is BreakerState.CLOSED else log.warning
    emit("breaker_changed", dependency=breaker.name, state=state.name.lower(),
         detail=breaker.describe())  # fmt: skip


class _Guard:
    """A call (or a few back to back) to one dependency under its circuit breaker.

    Raises ``_Refused`` on entry while the breaker is open. An error of the dependency (an
    HSM error other than ``InvalidInput``, a store error other than ``invalid`` or
    ``integrity``, which are answers) counts as a failure, and so does a call still
    unanswered when a deadline around it passed (the budget, the ARPC's limit); a call
    cancelled otherwise (a drain cut short) counts for nothing. A class rather than a
    generator: it is entered several times per request.
    """

    __slots__ = ("_breaker", "_permit")

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker
        self._permit: Permit | None = None

    def __enter__(self) -> None:
        self._permit = self._breaker.admit()
        if self._permit is None:
            raise _Refused(self._breaker.name)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object
    ) -> None:
        breaker, permit = self._breaker, self._permit
        assert permit is not None
        if exc is None:
            breaker.succeeded(permit)
        elif isinstance(exc, trio.Cancelled):
            if trio.current_time() >= trio.current_effective_deadline():
                breaker.failed(permit, "Timeout: no answer before the deadline")
            else:  # pragma: no cover - an explicit cancel (drain cut short)
                breaker.abandoned(permit)
        elif isinstance(exc, HsmError):
            if isinstance(exc, InvalidInput):
                breaker.succeeded(permit)
            else:
                breaker.failed(permit, f"{type(exc).__name__}: {exc}")
        elif isinstance(exc, StoreError):
            if exc.kind in ("invalid", "integrity"):
                breaker.succeeded(permit)
            else:
                breaker.failed(permit, f"StoreError: {exc}")
        else:
            breaker.abandoned(permit)


class _HsmCall(_Guard):
    """One HSM (or vault) command under its breaker, timed, its errors counted."""

    __slots__ = ("_command", "_t0")

    def __init__(self, breaker: Breaker, command: str) -> None:
        super().__init__(breaker)
        self._command = command
        self._t0 = 0.0

    def __enter__(self) -> None:
        super().__enter__()
        self._t0 = time.perf_counter()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        metrics.HSM_SECONDS.labels(self._command).observe(time.perf_counter() - self._t0)
        if isinstance(exc, HsmError):
            metrics.HSM_ERRORS.labels(self._command, type(exc).__name__).inc()
        super().__exit__(kind, exc, tb)


class _step:
    """Time one pipeline step into ``cardswitch_pipeline_step_seconds``."""

    __slots__ = ("_histogram", "_t0")

    def __init__(self, name: str) -> None:
        self._histogram = metrics.STEP_SECONDS.labels(name)
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *_exc: object) -> None:
        self._histogram.observe(time.perf_counter() - self._t0)


__all__ = ["Account", "Pipeline"]
