"""The OpenAPI description of the page's JSON endpoints, served at
``/openapi.json``. The request schema is the one the endpoint enforces."""

from __future__ import annotations

from typing import Any

from issuance.shared.domain import Refusal
from issuance.shared.wire.messages import CHANNEL, SLUG

MAX_PHONE_CHARS = 32
MAX_CHALLENGE_CHARS = 2048
# Refused by the page's own setting (ISSUANCE_WEB_ALLOWED_REGIONS), not by a domain rule.
REGION_REASON = "region"
TOKEN_HEADER = "X-Claim-Token"  # noqa: S105  # nosec B105 - a header's name, not a secret

UUID_OR_NULL: dict[str, Any] = {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "null"}]}

CLAIM_FORM: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["activity", "phone"],
    "properties": {
        "activity": {"type": "string", "pattern": SLUG.pattern, "description": "the activity's slug"},
        "phone": {
            "type": "string",
            "minLength": 3,
            "maxLength": MAX_PHONE_CHARS,
            "description": "the mobile number as typed; normalised to E.164 by the server",
        },
        "share_id": {**UUID_OR_NULL, "description": "the share the page was opened from, if any"},
        "channel": {
            "anyOf": [{"type": "string", "pattern": CHANNEL.pattern}, {"type": "null"}],
            "description": (
                "the channel the claim came through (the page sends its ?channel=), when it is not the"
                " activity's own; kept with the claim"
            ),
        },
        "claim_id": {
            **UUID_OR_NULL,
            "description": (
                "client-chosen claim ID (idempotency key) for publishers' scripts; the server picks one"
                " when absent, and the activity page never sends one"
            ),
        },
        "challenge": {
            "anyOf": [{"type": "string", "maxLength": MAX_CHALLENGE_CHARS}, {"type": "null"}],
            "description": "the answer to the challenge (SMS code or CAPTCHA token) when the server asks",
        },
    },
}

REASON: dict[str, Any] = {"type": "string", "enum": [*(r.value for r in Refusal), REGION_REASON]}

CLAIM_ANSWER: dict[str, Any] = {
    "type": "object",
    "required": ["status", "message"],
    "properties": {
        "status": {
            "type": "string",
            "enum": ["accepted", "refused", "invalid", "limited", "busy", "forbidden", "challenge"],
        },
        "claim_id": {"type": "string", "format": "uuid"},
        "status_token": {
            "type": "string",
            "pattern": "^[0-9a-f]{64}$",
            "description": "with an accepted claim: the token its status read requires",
        },
        "reason": REASON,
        "message": {"type": "string", "description": "the sentence to show the member"},
    },
}

CLAIM_STATUS: dict[str, Any] = {
    "type": "object",
    "required": ["status", "message"],
    "properties": {
        "status": {
            "type": "string",
            "enum": ["accepted", "bound", "credited", "refused", "unknown", "limited"],
        },
        "claim_id": {"type": "string", "format": "uuid"},
        "reason": REASON,
        "message": {"type": "string"},
        "coupons": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["code", "expires_at", "title", "kind", "value", "threshold_cents"],
                "properties": {
                    "code": {"type": "string"},
                    "expires_at": {"type": ["string", "null"], "format": "date-time"},
                    "title": {"type": "string", "description": "the title, e.g. 满50减10 (may be empty)"},
                    "kind": {"type": "string", "enum": ["discount_rate", "amount_off", "gift"]},
                    "value": {
                        "type": "integer",
                        "minimum": 0,
                        "description": (
                            "discount_rate: basis points off (1500 = 15% off); otherwise minor units"
                        ),
                    },
                    "threshold_cents": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "the spend the coupon needs, in minor units (0: none)",
                    },
                },
            },
        },
        "held": {
            "type": "boolean",
            "description": "bound, and credited only once the member registers on the platform",
        },
    },
}


def _answer(description: str, schema: str = "ClaimAnswer") -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Activity page API",
        "version": "1",
        "description": "Claim an activity's coupon package and follow the claim until it is credited.",
    },
    "paths": {
        "/api/claims": {
            "post": {
                "operationId": "requestClaim",
                "summary": "Request an activity's package for a mobile number",
                "description": (
                    "Answers at once when the answer is already known (bad number, already received,"
                    " similar activity, not started, ended, all packages gone); otherwise the claim is"
                    " queued with a confirmed publish and accepted. JSON only; browsers must post from"
                    " the page's own origin."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClaimForm"}}},
                },
                "responses": {
                    "202": _answer("accepted: the coupons arrive within the promise"),
                    "200": _answer("refused at once, with the reason"),
                    "400": _answer("the body is not JSON"),
                    "403": _answer("posted from another site, or the challenge is required or failed"),
                    "404": _answer("no such activity"),
                    "409": _answer("this claim ID was already used for another number"),
                    "413": _answer("the body is too large"),
                    "415": _answer("the body is not declared as application/json"),
                    "422": _answer(
                        "a field is missing or of the wrong type, or the number is not valid or of a region"
                        " this page does not serve"
                    ),
                    "429": _answer(
                        "too many attempts from this address, its network, for this number or this share"
                    ),
                    "503": _answer("busy, try again: the claim was not queued"),
                },
            }
        },
        "/api/claims/{claim_id}": {
            "get": {
                "operationId": "claimStatus",
                "summary": "Where a claim stands (for the claimant only)",
                "description": (
                    "Requires the claim's status token, returned with the accepted claim, as ?token= or"
                    f" the {TOKEN_HEADER} header; a wrong or missing token reads as an unknown claim."
                ),
                "parameters": [
                    {
                        "name": "claim_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "format": "uuid"},
                    },
                    {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": TOKEN_HEADER, "in": "header", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _answer("accepted, bound (being credited), credited or refused", "ClaimStatus"),
                    "404": _answer("no such claim, or not the claim's token", "ClaimStatus"),
                    "429": _answer("too many status reads from this address", "ClaimStatus"),
                    "503": _answer("the status cannot be read right now", "ClaimStatus"),
                },
            }
        },
    },
    "components": {
        "schemas": {"ClaimForm": CLAIM_FORM, "ClaimAnswer": CLAIM_ANSWER, "ClaimStatus": CLAIM_STATUS}
    },
}
