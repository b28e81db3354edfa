"""The wire protocol, with no I/O: text in, requests out; replies in, text out.

The frames themselves (attrs classes) are in `trio_relay._wire.frames`; this module re-exports
them, so that code speaking the protocol imports from one place.

Like h11 and wsproto, this module never touches a socket. `decode` turns one WebSocket text
frame into a typed request or raises `ProtocolError` carrying the error reply to send back;
`encode` turns a reply or push into the text of one frame. Everything here is synchronous and
tested without an event loop.

Field names on the wire are camelCase (``resourceId``, ``modelProfiles``) because the seed's web
client reads them; the attrs classes use snake_case and one private cattrs converter renames.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final, Literal, NoReturn, get_args

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from .._errors import leaves
from .frames import (
    _REQUEST_TYPES,
    DEVICE_NAME_MAX,
    JSON,
    MAX_ID_LENGTH,
    RESOURCES,
    AuthFailed,
    AuthRequest,
    AuthRequired,
    AuthSuccess,
    CancelRequest,
    CreateRequest,
    DataReply,
    ErrorCode,
    ErrorReply,
    ProtocolError,
    Reply,
    Request,
    RequestId,
    Resource,
    ResourceKey,
    SendRequest,
    Subscribed,
    SubscribeRequest,
    UnsubscribeRequest,
    check_device_name,
)

__all__ = [
    "DEVICE_NAME_MAX",
    "MAX_ID_LENGTH",
    "check_device_name",
    "error_reply",
    "RESOURCES",
    "AuthFailed",
    "AuthRequest",
    "AuthRequired",
    "AuthSuccess",
    "CancelRequest",
    "CreateRequest",
    "DataReply",
    "ErrorCode",
    "ErrorReply",
    "JSON",
    "ProtocolError",
    "Reply",
    "Request",
    "RequestId",
    "Resource",
    "ResourceKey",
    "SendRequest",
    "SubscribeRequest",
    "Subscribed",
    "UnsubscribeRequest",
    "decode",
    "encode",
]

# --- the converter ----------------------------------------------------------------------------

_WIRE_NAMES: Final = {
    "resource_id": "resourceId", "since_seq": "sinceSeq", "device_name": "deviceName",
    "retry_after": "retryAfter", "client_nonce": "clientNonce",
}


class _FieldError(TypeError):
    """Raised by our strict hooks; its text completes "field 'x' ..."."""


def _strict_str(value: object, _: object) -> str:
    if not isinstance(value, str):
        raise _FieldError("must be a string")
    return value


def _optional_str(value: object, _: object) -> str | None:
    return None if value is None else _strict_str(value, None)


def _optional_seq(value: object, _: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _FieldError("must be a non-negative integer")
    return value


def _resource(value: object, _: object) -> str:
    if value not in RESOURCES:
        raise _FieldError(f"must be one of {', '.join(RESOURCES)}")
    return str(value)


def _chat_only(value: object, _: object) -> str:
    if value != "chat":
        raise _FieldError("must be 'chat' (only chats can be created)")
    return "chat"


def _any(value: object, _: object) -> object:
    return value


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(str | None, _optional_str)
    conv.register_structure_hook(int | None, _optional_seq)
    # Literals and unions are not classes, so they are matched by predicate.
    conv.register_structure_hook_func(lambda t: t == Resource, _resource)
    conv.register_structure_hook_func(lambda t: t == Literal["chat"], _chat_only)
    conv.register_structure_hook_func(lambda t: t == RequestId, _any)  # checked before
    renames: dict[str, Any] = {attr: override(rename=wire) for attr, wire in _WIRE_NAMES.items()}
    for req in _REQUEST_TYPES.values():
        names = {a.name for a in attrs.fields(req)}
        overrides = {k: v for k, v in renames.items() if k in names}
        conv.register_structure_hook(req, make_dict_structure_fn(req, conv, **overrides))
    for rep in get_args(Reply):
        names = {a.name for a in attrs.fields(rep)}
        overrides = {k: v for k, v in renames.items() if k in names}
        # ``id`` is always on the wire (``null`` for pushes), and so is an error's ``code``;
        # absent optionals are left out.
        if "code" in names:
            overrides["code"] = override(omit_if_default=False)
        unstructure = make_dict_unstructure_fn(
            rep, conv, _cattrs_omit_if_default=True, id=override(omit_if_default=False), **overrides
        )
        conv.register_unstructure_hook(rep, _with_type(rep.type, unstructure))
    return conv


def _with_type(type_: str, unstructure: Any) -> Any:
    def hook(reply: Any) -> dict[str, Any]:
        fields = unstructure(reply)
        return {"id": fields.pop("id"), "type": type_, **fields}

    return hook


_converter: Final = _make_converter()

# --- decode -----------------------------------------------------------------------------------

# A JSON escape of a UTF-16 surrogate: json.loads accepts a lone one, which can never be
# encoded back to UTF-8, so such frames are checked before they go any further.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999 parses to inf, which cannot be sent back as JSON
        raise ValueError(f"{text} is out of range")
    return value


def _has_lone_surrogate(value: JSON) -> bool:
    # Iterative: a frame may nest as deep as json.loads allows.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def _bad_request(request_id: RequestId | None, error: str) -> ProtocolError:
    return ProtocolError(ErrorReply(id=request_id, error=error, code=ErrorCode.BAD_REQUEST))


def error_reply(request: Request, code: str, error: str) -> ErrorReply:
    """The error reply to ``request``, naming its resource as its own reply would."""
    resource = getattr(request, "resource", None)
    if isinstance(request, (SendRequest, CancelRequest)):
        resource = "chat"
    resource_id: str | None = getattr(request, "resource_id", None) or None
    return ErrorReply(id=request.id, error=error, code=code, resource=resource,
                      resource_id=resource_id)


#: Longest ``clientNonce`` of a send (a UUID is 36 characters).
MAX_NONCE_LENGTH: Final = 128


def decode(text: str) -> Request:
    """Decode one text frame into a request, or raise `ProtocolError` with the reply to send."""
    try:
        raw = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float)
    except (ValueError, RecursionError):
        raise _bad_request(None, "frame is not valid JSON") from None
    if not isinstance(raw, dict):
        raise _bad_request(None, "frame must be a JSON object")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(raw):
        raise _bad_request(None, "frame contains a lone UTF-16 surrogate escape")
    if not _valid_id(raw.get("id")):
        raise _bad_request(
            None,
            f"field 'id' must be a non-empty string of at most {MAX_ID_LENGTH} characters"
            " or an integer",
        )
    request_id: RequestId = raw["id"]
    request_type = raw.get("type")
    cls = _REQUEST_TYPES.get(request_type) if isinstance(request_type, str) else None
    if cls is None:
        raise _bad_request(request_id, f"field 'type' must be one of {', '.join(_REQUEST_TYPES)}")
    if cls is CreateRequest:
        raw = _lift_title(raw, request_id)
    try:
        request: Request = _converter.structure(raw, cls)
    except Exception as exc:  # cattrs reports through (groups of) exceptions of any type
        raise _bad_request(request_id, _describe(exc)) from None
    return _checked(request)


def _checked(request: Request) -> Request:
    """The rules that span fields, which the converter cannot express."""
    if isinstance(request, AuthRequest):
        return _checked_auth(request)
    if isinstance(request, (SubscribeRequest, UnsubscribeRequest)):
        if request.resource == "modelProfiles":
            # There is one modelProfiles resource: any id names it.
            return attrs.evolve(request, resource_id="")
        if not request.resource_id:
            raise _bad_request(
                request.id, f"field 'resourceId' is required for resource '{request.resource}'"
            )
    elif isinstance(request, (SendRequest, CreateRequest, CancelRequest)) and (
        not request.resource_id
    ):
        raise _bad_request(request.id, "field 'resourceId' is required")
    if isinstance(request, SendRequest):
        if request.message in (None, "", {}):
            raise _bad_request(request.id, "field 'message' must not be empty")
        nonce = request.client_nonce
        if nonce is not None and not (0 < len(nonce) <= MAX_NONCE_LENGTH and nonce.isprintable()):
            raise _bad_request(
                request.id,
                f"field 'clientNonce' must be 1 to {MAX_NONCE_LENGTH} printable characters",
            )
    return request


def _checked_auth(request: AuthRequest) -> AuthRequest:
    if (request.pin is None) == (request.token is None):
        raise _bad_request(request.id, "exactly one of the fields 'pin' and 'token' is required")
    if request.token is not None or request.device_name is None:
        return attrs.evolve(request, device_name=None)  # ignored with a token
    name = check_device_name(request.device_name)
    if name is None:
        raise _bad_request(
            request.id,
            f"field 'deviceName' must be 1 to {DEVICE_NAME_MAX} characters (after trimming),"
            " without control characters",
        )
    return attrs.evolve(request, device_name=name)


def _lift_title(raw: dict[str, JSON], request_id: RequestId) -> dict[str, JSON]:
    # ``create`` carries its fields inside ``message`` ({"title": ...}), as ``send`` carries
    # text; only those count, not same-named fields at the top level.
    message = raw.get("message")
    if message is None:
        return {**raw, "title": None, "model_profile_id": None}
    if not isinstance(message, dict):
        raise _bad_request(request_id, "field 'message' must be an object such as {\"title\": ...}")
    return {**raw, "title": message.get("title"),
            "model_profile_id": message.get("modelProfileId")}


def _describe(exc: BaseException) -> str:
    """One clear sentence naming the first bad field, from cattrs' exception group."""
    for leaf in leaves(exc):
        name = next(
            (n.name for n in getattr(leaf, "__notes__", ()) if hasattr(n, "name")), None
        )
        if name is None:
            continue
        wire = _WIRE_NAMES.get(name, name)
        if name == "title":
            wire = "message.title"
        elif name == "model_profile_id":
            wire = "message.modelProfileId"
        if isinstance(leaf, KeyError):
            return f"field '{wire}' is required"
        if isinstance(leaf, _FieldError):
            return f"field '{wire}' {leaf}"
        return f"field '{wire}' is invalid"
    return "request is malformed"


# --- encode -----------------------------------------------------------------------------------


def encode(reply: Reply) -> str:
    """Encode a reply or push as the text of one frame (compact JSON, UTF-8 safe).

    Raises `ValueError` or `TypeError` if the reply holds data that is not JSON (NaN, a
    datetime, ...): a browser's ``JSON.parse`` would reject such a frame.
    """
    obj = _converter.unstructure(reply)
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Backend data held a lone surrogate: escape it rather than fail on the wire.
        text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text
