"""Reading a JSON request body into a msgspec Struct: every problem is a 400 naming the field."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from chatq.errors import InvalidRequest, invalid_field

BodyT = TypeVar("BodyT")


def decode_body(body: bytes, kind: type[BodyT]) -> BodyT:
    """Decode and check a JSON body; a 400 names the offending field."""
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request: {exc}", param=invalid_field(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
