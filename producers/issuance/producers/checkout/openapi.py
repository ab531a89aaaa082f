"""The OpenAPI description of the checkout API, served at
``/api/openapi.json``. The request schemas are the ones the endpoints
enforce (issuance.producers.checkout.app parses exactly these)."""

from __future__ import annotations

from typing import Any

from issuance.shared.domain.coupons import LifecycleRefusal

ORDER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
CODE_PATTERN = r"^[A-Za-z0-9]{1,16}$"
MAX_CODES = 10
MAX_BIGINT = 2**63 - 1

REASON: dict[str, Any] = {"type": ["string", "null"], "enum": [*(r.value for r in LifecycleRefusal), None]}
MINOR_UNITS: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_BIGINT}

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.:/-]{0,63}$"
MAX_LINES = 100
MAX_ITEMS = 100_000
MAX_LEVEL = 1000
NAME: dict[str, Any] = {"type": "string", "pattern": NAME_PATTERN}

CART_LINE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["product", "amount_cents"],
    "properties": {
        "product": {**NAME, "description": "the product's ID (coupons scoped to products)"},
        "category": {**NAME, "description": "the product's category (coupons scoped to categories)"},
        "amount_cents": {**MINOR_UNITS, "description": "what the line costs, in minor units"},
        "quantity": {"type": "integer", "minimum": 1, "maximum": MAX_ITEMS, "default": 1},
    },
}

# The cart, as every operation that takes one reads it; the buyer is named by
# exactly one of the two member IDs.
CART_FIELDS: dict[str, Any] = {
    "member_id": {"type": "integer", "minimum": 1, "maximum": MAX_BIGINT, "description": "the member ID"},
    "app_member_id": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_BIGINT,
        "description": "the app's member ID (linked by member-registered), instead of member_id",
    },
    "amount_cents": {**MINOR_UNITS, "description": "the cart's amount in minor units (fen)"},
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_ITEMS},
    "lines": {
        "type": "array",
        "maxItems": MAX_LINES,
        "items": {"$ref": "#/components/schemas/CartLine"},
        "description": "the cart's lines (needed by coupons scoped to products or categories)",
    },
    "store": {**NAME, "description": "the store (needed by coupons limited to stores)"},
    "member_level": {"type": "integer", "minimum": 0, "maximum": MAX_LEVEL, "default": 0},
    "promotions": {
        "type": "boolean",
        "default": False,
        "description": "the order already uses another promotion (exclusive coupons then do not apply)",
    },
}
ONE_MEMBER: list[dict[str, Any]] = [{"required": ["member_id"]}, {"required": ["app_member_id"]}]

CART_QUERY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["amount_cents", "items"],
    "oneOf": ONE_MEMBER,
    "properties": CART_FIELDS,
}

CART_REQUEST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["amount_cents", "items", "codes"],
    "oneOf": ONE_MEMBER,
    "properties": {
        **CART_FIELDS,
        "codes": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_CODES,
            "uniqueItems": True,
            "items": {"type": "string", "pattern": CODE_PATTERN},
            "description": "the coupon codes the buyer chose",
        },
    },
}

RULES: dict[str, Any] = {
    "type": "object",
    "description": "the coupon's rules, as its template sets them (empty scope: no restriction)",
    "required": [
        "scope_products",
        "scope_categories",
        "scope_stores",
        "min_items",
        "min_member_level",
        "stackable",
        "priority",
        "per_person_limit",
    ],
    "properties": {
        "scope_products": {"type": "array", "items": {"type": "string"}},
        "scope_categories": {"type": "array", "items": {"type": "string"}},
        "scope_stores": {"type": "array", "items": {"type": "string"}},
        "min_items": {"type": "integer", "minimum": 0},
        "min_member_level": {"type": "integer", "minimum": 0},
        "stackable": {"type": "boolean", "description": "false: alone in its order, with no other promotion"},
        "priority": {"type": "integer", "minimum": 0, "description": "among equal savings, higher first"},
        "per_person_limit": {
            "type": ["integer", "null"],
            "minimum": 1,
            "description": "how many coupons of the template one member may use (null: no limit)",
        },
    },
}

MAX_PARTNER = 64
MAX_WHY = 200
WRITE_OFF_REQUEST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["partner", "reason"],
    "properties": {
        "partner": {**NAME, "description": "the partner writing the code off (kept in the audit record)"},
        "reason": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_WHY,
            "description": "why, e.g. the partner's own voucher or receipt number (kept in the audit record)",
        },
    },
}

WRITE_OFF_ANSWER: dict[str, Any] = {
    "type": "object",
    "required": ["code", "outcome", "repeated", "record", "reason", "message"],
    "properties": {
        "code": {"type": "string"},
        "outcome": {"type": "string", "enum": ["written_off", "refused"]},
        "repeated": {"type": "boolean", "description": "written off before: the record is the first one"},
        "record": {
            "type": ["object", "null"],
            "required": ["code", "channel", "written_off_by", "reason", "member_id", "written_off_at"],
            "properties": {
                "code": {"type": "string"},
                "channel": {"type": "string", "enum": ["operator", "partner"]},
                "written_off_by": {"type": "string"},
                "reason": {"type": "string"},
                "member_id": {
                    "type": ["integer", "null"],
                    "description": "whose it was (null: never issued)",
                },
                "written_off_at": {"type": "string", "format": "date-time"},
            },
        },
        "reason": REASON,
        "message": {"type": ["string", "null"]},
    },
}

EMPTY_REQUEST: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": {}}

REFUND_REQUEST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "refunded_by": {
            "type": "string",
            "enum": ["buyer", "merchant"],
            "default": "buyer",
            "description": "who refunds: a merchant's refund before fulfilment gives the coupons back",
        },
        "fulfilled": {
            "type": "boolean",
            "default": False,
            "description": "whether the order was fulfilled (shipped): a refund after it voids the coupons",
        },
    },
}

ANSWER: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "outcome", "discount_cents", "coupons", "refused", "reason", "message"],
    "properties": {
        "order_id": {"type": "string"},
        "outcome": {
            "type": "string",
            "enum": ["valid", "reserved", "redeemed", "released", "returned", "voided", "refused"],
        },
        "discount_cents": {**MINOR_UNITS, "description": "the order's total saving"},
        "coupons": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["code", "discount_cents"],
                "properties": {"code": {"type": "string"}, "discount_cents": MINOR_UNITS},
            },
        },
        "refused": {
            "type": "array",
            "description": "each chosen code that does not apply, with its reason",
            "items": {
                "type": "object",
                "required": ["code", "reason", "message"],
                "properties": {"code": {"type": "string"}, "reason": REASON, "message": {"type": "string"}},
            },
        },
        "reason": {**REASON, "description": "why the operation was refused (null when it was not)"},
        "message": {"type": ["string", "null"]},
    },
}

COUPON_OPTION: dict[str, Any] = {
    "type": "object",
    "required": [
        "code",
        "kind",
        "value",
        "threshold_cents",
        "status",
        "valid_from",
        "expires_at",
        "applicable",
        "discount_cents",
        "reason",
        "message",
        "rules",
    ],
    "properties": {
        "code": {"type": "string"},
        "kind": {"type": "string", "enum": ["discount_rate", "amount_off", "gift"]},
        "value": {
            "type": "integer",
            "description": "discount_rate: basis points off (1500 = 15% off); otherwise minor units",
        },
        "threshold_cents": MINOR_UNITS,
        "status": {
            "type": "string",
            "enum": ["unused", "used", "expired", "cancelled", "voided", "written_off"],
        },
        "valid_from": {"type": ["string", "null"], "format": "date-time"},
        "expires_at": {"type": ["string", "null"], "format": "date-time"},
        "applicable": {"type": "boolean"},
        "discount_cents": {**MINOR_UNITS, "description": "the saving on this cart (0 when not applicable)"},
        "reason": REASON,
        "message": {"type": ["string", "null"], "description": "why the coupon does not apply"},
        "rules": {"$ref": "#/components/schemas/CouponRules"},
    },
}

COUPON_LIST: dict[str, Any] = {
    "type": "object",
    "required": ["member_id", "amount_cents", "items", "coupons"],
    "properties": {
        "member_id": {"type": "integer"},
        "amount_cents": MINOR_UNITS,
        "items": {"type": "integer"},
        "best": {"type": ["string", "null"], "description": "the code of the best applicable coupon"},
        "coupons": {"type": "array", "items": {"$ref": "#/components/schemas/CouponOption"}},
    },
}

ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what is wrong with the request"}},
}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


ORDER_PARAMETER: dict[str, Any] = {
    "name": "order_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": ORDER_ID_PATTERN},
    "description": "the order system's order ID: the idempotency key of every operation",
}


def _order_operation(
    operation_id: str, summary: str, description: str, request: str, ok: str
) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "description": description,
            "parameters": [ORDER_PARAMETER],
            "requestBody": {
                "required": request == "CartRequest",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}},
            },
            "responses": {
                "200": _json("CheckoutAnswer", ok),
                "404": _json(
                    "CheckoutAnswer",
                    "no reservation for this order (reason unknown_order), or no member linked to the"
                    " app_member_id (reason unknown_member)",
                ),
                "409": _json("CheckoutAnswer", "refused, with the reason (and each code's reason)"),
                "413": _json("Error", "the body is too large"),
                "415": _json("Error", "the body is not declared as application/json"),
                "422": _json("Error", "the request is not what this description says"),
            },
        }
    }


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Checkout coupon API",
        "version": "1",
        "description": (
            "For the order system: which of a member's coupons apply to a cart and what each saves,"
            " best first; validate a chosen set; reserve it when the order is created, redeem it at"
            " payment, release it on unpaid cancellation (a reservation also lapses after its hold);"
            " on a refund, return the coupons (the merchant's, before fulfilment) or void them."
            " Every operation is idempotent by order ID; a code is held or redeemed by at most one"
            " order. A buyer is named by the member ID or by the app's member ID. The coupons' own"
            " rules (scope, stacking, priority, per-person count) are judged on the cart described."
            " Amounts are integers in minor units. Times are the server's."
        ),
    },
    "paths": {
        "/api/members/{member_id}/coupons": {
            "get": {
                "operationId": "listCoupons",
                "summary": "A member's coupons against a cart, best first",
                "description": (
                    "Applicable coupons first, by largest saving, then highest priority, then soonest"
                    " to expire, then code; then the others, each with the reason it does not apply."
                    " A coupon scoped to products, categories or stores needs the cart's lines or"
                    " store: use listCouponsForCart."
                ),
                "parameters": [
                    {
                        "name": "member_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_BIGINT},
                    },
                    {"name": "amount_cents", "in": "query", "required": True, "schema": MINOR_UNITS},
                    {
                        "name": "items",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 0, "maximum": 100_000},
                    },
                ],
                "responses": {
                    "200": _json("CouponList", "the member's coupons (an unknown member has none)"),
                    "422": _json("Error", "a parameter is missing or not a non-negative integer"),
                },
            }
        },
        "/api/app-members/{app_member_id}/coupons": {
            "get": {
                "operationId": "listAppMemberCoupons",
                "summary": "The same, for the member an app member ID is linked to",
                "parameters": [
                    {
                        "name": "app_member_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_BIGINT},
                    },
                    {"name": "amount_cents", "in": "query", "required": True, "schema": MINOR_UNITS},
                    {
                        "name": "items",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ITEMS},
                    },
                ],
                "responses": {
                    "200": _json("CouponList", "the member's coupons"),
                    "404": _json("Error", "no member is linked to this app member ID"),
                    "422": _json("Error", "a parameter is missing or not a non-negative integer"),
                },
            }
        },
        "/api/carts/coupons": {
            "post": {
                "operationId": "listCouponsForCart",
                "summary": "A member's coupons against a whole cart (lines, store, level), best first",
                "description": (
                    "As listCoupons, for a cart described in full, so that coupons scoped to products,"
                    " categories, stores or member levels are judged on it."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CartQuery"}}},
                },
                "responses": {
                    "200": _json("CouponList", "the member's coupons"),
                    "404": _json("Error", "no member is linked to the app_member_id"),
                    "413": _json("Error", "the body is too large"),
                    "415": _json("Error", "the body is not declared as application/json"),
                    "422": _json("Error", "the request is not what this description says"),
                },
            }
        },
        "/api/orders/{order_id}/validate": _order_operation(
            "validateCoupons",
            "Would these codes apply to this cart?",
            "Holds nothing. outcome valid, with each code's saving (together never more than the cart).",
            "CartRequest",
            "valid",
        ),
        "/api/orders/{order_id}/reserve": _order_operation(
            "reserveCoupons",
            "Hold the chosen codes for an order being created",
            (
                "Records the order (placed) and holds its codes. The same request again answers the"
                " same; the same order ID with another member, amount or codes is refused"
                " (order_conflict); a code another order holds is refused (held_by_another_order)."
            ),
            "CartRequest",
            "reserved (or, asked again, the order's current state)",
        ),
        "/api/orders/{order_id}/redeem": _order_operation(
            "redeemCoupons",
            "The order is paid: its held codes become used",
            (
                "Each code becomes used with the order, the time and the reserved discount. Again:"
                " the same answer. A lapsed hold is refused (reservation_expired)."
            ),
            "EmptyRequest",
            "redeemed",
        ),
        "/api/orders/{order_id}/release": _order_operation(
            "releaseCoupons",
            "The order was cancelled before payment: its codes are free again",
            "A paid order's codes are not released (order_already_paid). Again: the same answer.",
            "EmptyRequest",
            "released",
        ),
        "/api/orders/{order_id}/refund": _order_operation(
            "refundCoupons",
            "The paid order is refunded: its codes are returned or voided",
            (
                "A merchant's refund before fulfilment returns the codes (an expired one comes back"
                " expired): outcome returned. Any other refund voids them: outcome voided, final."
                " An unpaid order is refused (not_paid: release it). Again: the same answer."
            ),
            "RefundRequest",
            "returned or voided",
        ),
        "/api/codes/{code}/write-off": {
            "post": {
                "operationId": "writeOffCode",
                "summary": "Redeem a gift coupon or a partner's or printed code without an order",
                "description": (
                    "A partner writes a code off: a never-issued code (exported for a partner or for"
                    " printing), or a gift coupon in a member's wallet. The database keeps an audit"
                    " record (partner, reason, time, code, owner). Again: the first record, repeated"
                    " true. A code used, voided, cancelled, expired, held by an order or of a kind"
                    " used in orders is refused (409) with the reason; an unknown code is 404."
                ),
                "parameters": [
                    {
                        "name": "code",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": CODE_PATTERN},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/WriteOffRequest"}}
                    },
                },
                "responses": {
                    "200": _json("WriteOffAnswer", "written off (now, or before: repeated)"),
                    "404": _json("WriteOffAnswer", "no such code (reason unknown_code)"),
                    "409": _json("WriteOffAnswer", "refused, with the reason"),
                    "413": _json("Error", "the body is too large"),
                    "415": _json("Error", "the body is not application/json"),
                    "422": _json("Error", "the request does not match the schema"),
                },
            }
        },
    },
    # With ISSUANCE_CHECKOUT_TOKENS set (the default outside a loopback
    # --no-auth), every operation needs a bearer token (401 without one).
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "a token of ISSUANCE_CHECKOUT_TOKENS (name:token); a partner's write-offs"
                " are made in its own name (403 otherwise)",
            }
        },
        "schemas": {
            "WriteOffRequest": WRITE_OFF_REQUEST,
            "WriteOffAnswer": WRITE_OFF_ANSWER,
            "CartRequest": CART_REQUEST,
            "CartQuery": CART_QUERY,
            "CartLine": CART_LINE,
            "CouponRules": RULES,
            "EmptyRequest": EMPTY_REQUEST,
            "RefundRequest": REFUND_REQUEST,
            "CheckoutAnswer": ANSWER,
            "CouponOption": COUPON_OPTION,
            "CouponList": COUPON_LIST,
            "Error": ERROR,
        },
    },
}
