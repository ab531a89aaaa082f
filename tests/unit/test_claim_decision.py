"""The claim decision of issuance.shared.domain.claims, with no database:
every refusal, the order in which they win, and what a grant takes."""

from __future__ import annotations

import ast
import itertools
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from issuance.shared.domain import ActivityRules, Refusal, TemplateRef, coupon_expiry
from issuance.shared.domain import claims as decision
from issuance.shared.domain.claims import (
    REFUSAL_PRECEDENCE,
    ActivityTerms,
    ClaimRequest,
    ClaimStatus,
    Granted,
    Holding,
    Refused,
    Stock,
    decide_claims,
)

NOW = datetime(2026, 11, 11, 12, 0, tzinfo=UTC)
PHONE = "+8613800138000"


def activity(
    activity_id: int = 1,
    *,
    group: str = "spring",
    online: bool = True,
    starts_at: datetime = NOW - timedelta(hours=1),
    ends_at: datetime = NOW + timedelta(hours=1),
    templates: tuple[tuple[int, bool], ...] = ((10, False),),
    hold: bool = False,
) -> ActivityTerms:
    return ActivityTerms(
        activity_id=activity_id,
        slug=f"activity-{activity_id}",
        rules=ActivityRules(online=online, starts_at=starts_at, ends_at=ends_at),
        timezone="Asia/Shanghai",
        exclusivity_group=group,
        validity_days=7,
        valid_until=None,
        hold_until_registered=hold,
        templates=tuple(TemplateRef(template_id=t, new_user_only=n) for t, n in templates),
    )


def request(
    terms: ActivityTerms | None,
    *,
    member: int | None = 100,
    phone: str | None = PHONE,
    requested_at: datetime = NOW,
) -> ClaimRequest:
    return ClaimRequest(
        claim_id=uuid.uuid4(), activity=terms, requested_at=requested_at, phone=phone, member_id=member
    )


def stock(slots: dict[int, list[int]] | None = None, codes: dict[int, list[str]] | None = None) -> Stock:
    return Stock(
        slots={1: [1, 2, 3]} if slots is None else slots,
        codes={10: ["A1", "A2", "A3"], 11: ["B1", "B2", "B3"]} if codes is None else codes,
    )


def decide_one(
    claim: ClaimRequest,
    *,
    holdings: dict[int, list[Holding]] | None = None,
    free: Stock | None = None,
    credit_inline: bool = True,
) -> Refused | Granted:
    (result,) = decide_claims(
        [claim],
        holdings=holdings or {},
        stock=free or stock(),
        now=NOW,
        credit_inline=credit_inline,
    )
    return result


# --- each refusal alone ---------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "holdings", "free", "reason"),
    [
        (request(None), {}, None, Refusal.UNKNOWN_ACTIVITY),
        (request(activity(starts_at=NOW + timedelta(seconds=1))), {}, None, Refusal.NOT_STARTED),
        (request(activity(ends_at=NOW)), {}, None, Refusal.ENDED),
        (request(activity(online=False)), {}, None, Refusal.ENDED),
        (request(activity(), phone=None, member=None), {}, None, Refusal.BAD_PHONE),
        (request(activity()), {100: [Holding(1, "spring")]}, None, Refusal.ALREADY_RECEIVED),
        (request(activity()), {100: [Holding(2, "spring")]}, None, Refusal.SIMILAR_ACTIVITY),
        (request(activity()), {}, stock(slots={1: []}), Refusal.SOLD_OUT),
        (request(activity()), {}, stock(slots={}), Refusal.SOLD_OUT),
        (
            request(activity(templates=((10, False), (11, False)))),
            {},
            stock(codes={10: ["A"]}),
            Refusal.POOL_EMPTY,
        ),
    ],
    ids=[
        "unknown-activity",
        "not-started",
        "ended",
        "offline",
        "bad-phone",
        "already-received",
        "similar-activity",
        "sold-out",
        "no-slots-loaded",
        "pool-empty",
    ],
)
def test_each_refusal(claim, holdings, free, reason):
    assert decide_one(claim, holdings=holdings, free=free) == Refused(reason)


def test_every_refusal_has_its_place_in_the_precedence():
    assert sorted(REFUSAL_PRECEDENCE) == sorted(Refusal)
    assert len(set(REFUSAL_PRECEDENCE)) == len(REFUSAL_PRECEDENCE)


def test_a_member_of_another_group_is_granted():
    granted = decide_one(request(activity()), holdings={100: [Holding(2, "autumn")]})
    assert isinstance(granted, Granted)
    assert granted.new_member is False


# --- what a grant takes ------------------------------------------------------------


def test_a_grant_takes_one_slot_and_one_code_per_template():
    terms = activity(templates=((10, False), (11, False)))
    granted = decide_one(request(terms))
    assert isinstance(granted, Granted)
    assert granted.slot_no == 3
    assert granted.codes == ("A3", "B3")
    assert [t.template_id for t in granted.templates] == [10, 11]
    assert granted.member_id == 100 and granted.new_member and granted.activity is terms
    assert granted.expires_at == coupon_expiry(NOW, zone="Asia/Shanghai", validity_days=7, valid_until=None)


def test_new_user_templates_go_to_new_members_only_and_only_their_pool_counts_for_them():
    terms = activity(templates=((10, False), (11, True)))
    new = decide_one(request(terms))
    assert isinstance(new, Granted) and [t.template_id for t in new.templates] == [10, 11]
    # A returning member does not need the new-user pool, even when it is empty.
    returning = decide_one(
        request(terms), holdings={100: [Holding(5, "autumn")]}, free=stock(codes={10: ["A"], 11: []})
    )
    assert isinstance(returning, Granted) and returning.codes == ("A",)
    assert decide_one(request(terms), free=stock(codes={10: ["A"], 11: []})) == Refused(Refusal.POOL_EMPTY)


@pytest.mark.parametrize(
    ("inline", "hold", "status"),
    [
        (True, False, ClaimStatus.CREDITED),
        (False, False, ClaimStatus.BOUND),
        (True, True, ClaimStatus.BOUND),
        (False, True, ClaimStatus.BOUND),
    ],
)
def test_a_grant_is_credited_with_its_binding_unless_the_credit_may_wait(inline, hold, status):
    granted = decide_one(request(activity(hold=hold)), credit_inline=inline)
    assert isinstance(granted, Granted) and granted.status is status


def test_a_publisher_clock_ahead_of_ours_does_not_move_the_window_or_the_expiry():
    # Asked "in two hours" by the publisher's clock, at NOW by ours: inside
    # the window, and the coupons expire counting from NOW.
    terms = activity(ends_at=NOW + timedelta(minutes=1))
    granted = decide_one(request(terms, requested_at=NOW + timedelta(days=1)))
    assert isinstance(granted, Granted)
    assert granted.expires_at == coupon_expiry(NOW, zone="Asia/Shanghai", validity_days=7, valid_until=None)


def test_the_same_member_twice_in_one_batch_gets_one_package():
    terms = activity()
    first, second = decide_claims(
        [request(terms), request(terms)], holdings={}, stock=stock(), now=NOW, credit_inline=True
    )
    assert isinstance(first, Granted)
    assert second == Refused(Refusal.ALREADY_RECEIVED)


def test_a_grant_in_the_batch_makes_a_similar_activity_refuse_the_member_later_in_it():
    first, second, other = decide_claims(
        [request(activity(1)), request(activity(2)), request(activity(2), member=200)],
        holdings={},
        stock=stock(slots={1: [1], 2: [1]}, codes={10: ["A", "B"]}),
        now=NOW,
        credit_inline=True,
    )
    assert isinstance(first, Granted) and isinstance(other, Granted)
    assert second == Refused(Refusal.SIMILAR_ACTIVITY)


def test_the_decision_does_not_change_what_it_was_given():
    holdings = {100: [Holding(7, "autumn")]}
    free = stock()
    decide_claims([request(activity())], holdings=holdings, stock=free, now=NOW, credit_inline=True)
    assert holdings == {100: [Holding(7, "autumn")]}
    assert free == stock()


# --- precedence: whatever applies together, the first in the order wins ---------

CONDITIONS = {
    "unknown": Refusal.UNKNOWN_ACTIVITY,
    "offline": Refusal.ENDED,
    "before_start": Refusal.NOT_STARTED,
    "after_end": Refusal.ENDED,
    "bad_phone": Refusal.BAD_PHONE,
    "already": Refusal.ALREADY_RECEIVED,
    "similar": Refusal.SIMILAR_ACTIVITY,
    "sold_out": Refusal.SOLD_OUT,
    "pool_empty": Refusal.POOL_EMPTY,
}


def situation(applies: set[str]) -> tuple[ClaimRequest, dict[int, list[Holding]], Stock]:
    """A claim for which exactly the conditions in ``applies`` hold."""
    terms = activity(
        online="offline" not in applies,
        starts_at=NOW + timedelta(hours=1) if "before_start" in applies else NOW - timedelta(hours=2),
        ends_at=NOW - timedelta(hours=1) if "after_end" in applies else NOW + timedelta(hours=2),
        templates=((10, False), (11, False)),
    )
    held = []
    if "already" in applies:
        held.append(Holding(1, "spring"))
    if "similar" in applies:
        held.append(Holding(2, "spring"))
    claim = request(
        None if "unknown" in applies else terms,
        phone=None if "bad_phone" in applies else PHONE,
        member=None if "bad_phone" in applies else 100,
    )
    free = stock(
        slots={1: []} if "sold_out" in applies else {1: [1]},
        codes={10: ["A"], 11: []} if "pool_empty" in applies else {10: ["A"], 11: ["B"]},
    )
    return claim, {100: held}, free


@settings(max_examples=300, deadline=None)
@given(st.sets(st.sampled_from(sorted(CONDITIONS))).filter(lambda s: not {"before_start", "after_end"} <= s))
def test_the_first_applicable_refusal_in_the_documented_order_wins(applies):
    claim, holdings, free = situation(applies)
    result = decide_one(claim, holdings=holdings, free=free)
    applicable = {CONDITIONS[c] for c in applies}
    expected = next((r for r in REFUSAL_PRECEDENCE if r in applicable), None)
    if expected is None:
        assert isinstance(result, Granted)
    else:
        assert result == Refused(expected)


def test_every_pair_of_refusals_resolves_in_the_documented_order():
    # The exhaustive companion of the property above, for pairs.
    for a, b in itertools.combinations(sorted(CONDITIONS), 2):
        if {a, b} == {"before_start", "after_end"}:
            continue
        claim, holdings, free = situation({a, b})
        winner = min(CONDITIONS[a], CONDITIONS[b], key=REFUSAL_PRECEDENCE.index)
        assert decide_one(claim, holdings=holdings, free=free) == Refused(winner), (a, b)


# --- a batch never hands out more than it may ---------------------------------------

ACTIVITIES = {
    1: activity(1, group="spring", templates=((10, False), (11, True))),
    2: activity(2, group="spring", templates=((20, False),)),
    3: activity(3, group="autumn", templates=((30, False),)),
}
GROUP_OF = {a: t.exclusivity_group for a, t in ACTIVITIES.items()}


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[ClaimRequest], dict[int, list[Holding]], Stock]:
    members = st.integers(min_value=1, max_value=5)
    claims = draw(
        st.lists(
            st.tuples(members, st.sampled_from(sorted(ACTIVITIES)), st.booleans()), min_size=1, max_size=30
        )
    )
    requests = [
        request(ACTIVITIES[a], member=m if valid else None, phone=PHONE if valid else None)
        for m, a, valid in claims
    ]
    holdings = {
        m: [Holding(a, GROUP_OF[a])]
        for m, a in draw(st.dictionaries(members, st.sampled_from(sorted(ACTIVITIES)))).items()
    }
    free = Stock(
        slots={a: list(range(draw(st.integers(0, 6)))) for a in ACTIVITIES},
        codes={
            t.template_id: [f"{t.template_id}-{i}" for i in range(draw(st.integers(0, 6)))]
            for terms in ACTIVITIES.values()
            for t in terms.templates
        },
    )
    return requests, holdings, free


@settings(max_examples=300, deadline=None)
@given(batches())
def test_a_batch_grants_one_package_per_member_per_activity_and_group_and_never_a_slot_or_code_twice(batch):
    requests, holdings, free = batch
    results = decide_claims(requests, holdings=holdings, stock=free, now=NOW, credit_inline=True)
    assert len(results) == len(requests)
    granted = [r for r in results if isinstance(r, Granted)]
    per_member: dict[int, list[Holding]] = {m: list(h) for m, h in holdings.items()}
    for g in granted:
        per_member.setdefault(g.member_id, []).append(
            Holding(g.activity.activity_id, g.activity.exclusivity_group)
        )
    for held in per_member.values():
        assert len({h.activity_id for h in held}) == len(held), "two packages of one activity"
        assert len({h.group for h in held}) == len(held), "two packages of one exclusivity group"
    slots = [(g.activity.activity_id, g.slot_no) for g in granted]
    assert len(set(slots)) == len(slots)
    assert all(s in free.slots[a] for a, s in slots)
    codes = [(t.template_id, c) for g in granted for t, c in zip(g.templates, g.codes, strict=True)]
    assert len({c for _, c in codes}) == len(codes)
    assert all(c in free.codes[t] for t, c in codes)
    # Sold out means every free slot of the activity went to a claim before it.
    for i, result in enumerate(results):
        if result == Refused(Refusal.SOLD_OUT):
            activity_id = requests[i].activity.activity_id  # type: ignore[union-attr]
            before = Counter(g.activity.activity_id for g in results[:i] if isinstance(g, Granted))
            assert before[activity_id] == len(free.slots[activity_id])


def test_the_domain_imports_no_infrastructure():
    forbidden = {"sqlalchemy", "psycopg", "psycopg_pool", "pika", "redis", "dramatiq", "prometheus_client"}
    for path in Path(decision.__file__).parent.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & forbidden, path.name


def test_the_stored_statuses_are_the_ones_the_database_accepts():
    from issuance.shared.db.models import Claim

    checks = [str(c.sqltext) for c in Claim.__table__.constraints if c.name == "claims_status_check"]
    assert checks, "the claims table checks its status"
    stored = {s for s in ClaimStatus if s is not ClaimStatus.CONFLICT}
    assert all(f"'{s.value}'" in checks[0] for s in stored)
    assert f"'{ClaimStatus.CONFLICT.value}'" not in checks[0]
