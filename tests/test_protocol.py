"""The wire codec: frames in, requests out; replies in, frames out. No event loop, no I/O.

Like h11's and wsproto's tests, everything here is a plain synchronous function. Expected
frames are written out as the wire contract (``shared/CONTRACT.md``) shows them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_relay._wire.protocol import (
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
    Resource,
    ResourceKey,
    SendRequest,
    Subscribed,
    SubscribeRequest,
    UnsubscribeRequest,
    decode,
    encode,
)

# --- helpers ----------------------------------------------------------------------------------

NOT_JSON = "frame is not valid JSON"
NOT_OBJECT = "frame must be a JSON object"
LONE_SURROGATE = "frame contains a lone UTF-16 surrogate escape"
BAD_ID = (
    f"field 'id' must be a non-empty string of at most {MAX_ID_LENGTH} characters or an integer"
)
BAD_TYPE = "field 'type' must be one of auth, subscribe, unsubscribe, send, create, cancel"
BAD_RESOURCE = "field 'resource' must be one of project, chat, modelProfiles"


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON")


def strict_loads(text: str) -> Any:
    """`json.loads` that, like a browser's ``JSON.parse``, refuses NaN and Infinity."""
    return json.loads(text, parse_constant=_reject_constant)


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def bad(text: str) -> dict[str, Any]:
    """Decode ``text``, which must fail, and return the error frame the relay would send."""
    with pytest.raises(ProtocolError) as info:
        decode(text)
    reply = info.value.reply
    assert isinstance(reply, ErrorReply)
    assert str(info.value) == reply.error
    wire = strict_loads(encode(reply))
    assert isinstance(wire, dict)
    return wire


def error(request_id: Any, text: str) -> dict[str, Any]:
    return {"id": request_id, "type": "error", "error": text, "code": "bad_request"}


# --- decoding: every request type -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The seed's own frames, byte for byte.
        (
            '{"id":"sub-chat-1","type":"subscribe","resource":"chat","resourceId":"c1"}',
            SubscribeRequest(id="sub-chat-1", resource="chat", resource_id="c1"),
        ),
        (
            '{"id":"send-1","type":"send","resourceId":"c1","message":{"message":"hi"}}',
            SendRequest(id="send-1", resource_id="c1", message={"message": "hi"}),
        ),
        (
            '{"id":"unsub-1","type":"unsubscribe","resource":"chat","resourceId":"c1"}',
            UnsubscribeRequest(id="unsub-1", resource="chat", resource_id="c1"),
        ),
        ('{"id":"a","type":"auth","pin":"1234"}', AuthRequest(id="a", pin="1234")),
    ],
)
def test_seed_frames(text: str, expected: Request) -> None:
    assert decode(text) == expected


def test_auth() -> None:
    request = decode(frame(id="auth-1", type="auth", pin="0000"))
    assert request == AuthRequest(id="auth-1", pin="0000")
    assert request.type == "auth"


def test_auth_pin_may_be_non_ascii() -> None:
    assert decode(frame(id=1, type="auth", pin="пин-é")) == AuthRequest(id=1, pin="пин-é")


@pytest.mark.parametrize("resource", ["project", "chat"])
def test_subscribe(resource: Resource) -> None:
    request = decode(frame(id="s", type="subscribe", resource=resource, resourceId="r1"))
    assert request == SubscribeRequest(id="s", resource=resource, resource_id="r1")
    assert isinstance(request, SubscribeRequest)
    assert request.since_seq is None
    assert request.key == ResourceKey(resource, "r1")
    assert str(request.key) == f"{resource}:r1"


@pytest.mark.parametrize("since", [0, 1, 41, 2**53])
def test_subscribe_since_seq(since: int) -> None:
    request = decode(
        frame(id="s", type="subscribe", resource="chat", resourceId="c1", sinceSeq=since)
    )
    assert request == SubscribeRequest(id="s", resource="chat", resource_id="c1", since_seq=since)


def test_subscribe_since_seq_null_is_absent() -> None:
    request = decode(
        frame(id="s", type="subscribe", resource="chat", resourceId="c1", sinceSeq=None)
    )
    assert request == SubscribeRequest(id="s", resource="chat", resource_id="c1")


@pytest.mark.parametrize("request_type", ["subscribe", "unsubscribe"])
def test_model_profiles_without_resource_id(request_type: str) -> None:
    request = decode(frame(id="m", type=request_type, resource="modelProfiles"))
    cls = SubscribeRequest if request_type == "subscribe" else UnsubscribeRequest
    assert request == cls(id="m", resource="modelProfiles", resource_id="")
    assert isinstance(request, (SubscribeRequest, UnsubscribeRequest))
    assert request.key == ResourceKey("modelProfiles", "")
    assert str(request.key) == "modelProfiles"


@pytest.mark.parametrize("request_type", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("resource_id", ["", "default", "anything-at-all"])
def test_model_profiles_with_resource_id_names_the_one_resource(
    request_type: str, resource_id: str
) -> None:
    # There is a single modelProfiles resource, so whatever id a client sends names it.
    request = decode(
        frame(id="m", type=request_type, resource="modelProfiles", resourceId=resource_id)
    )
    assert isinstance(request, (SubscribeRequest, UnsubscribeRequest))
    assert request.resource == "modelProfiles"
    assert request.resource_id == ""
    assert request.key == ResourceKey("modelProfiles", "")


@pytest.mark.parametrize("resource", ["project", "chat"])
def test_unsubscribe(resource: Resource) -> None:
    request = decode(frame(id=9, type="unsubscribe", resource=resource, resourceId="x"))
    assert request == UnsubscribeRequest(id=9, resource=resource, resource_id="x")


@pytest.mark.parametrize(
    "message",
    [{"message": "hi"}, "plain text", ["a", 1], {"text": "é 世界 😀", "attachments": []}, 0, False],
)
def test_send_carries_any_non_empty_json(message: Any) -> None:
    request = decode(frame(id="send-2", type="send", resourceId="c1", message=message))
    assert request == SendRequest(id="send-2", resource_id="c1", message=message)


def test_create_with_title() -> None:
    request = decode(
        frame(id="new", type="create", resource="chat", resourceId="p1", message={"title": "Plan"})
    )
    assert request == CreateRequest(id="new", resource="chat", resource_id="p1", title="Plan")


@pytest.mark.parametrize(
    "extra", [{"message": {}}, {"message": {"title": None}}, {"message": None}, {}]
)
def test_create_without_title(extra: dict[str, Any]) -> None:
    request = decode(frame(id="new", type="create", resource="chat", resourceId="p1", **extra))
    assert request == CreateRequest(id="new", resource="chat", resource_id="p1", title=None)


def test_create_ignores_other_message_fields() -> None:
    request = decode(
        frame(
            id="new", type="create", resource="chat", resourceId="p1",
            message={"title": "T", "color": "blue"},
        )
    )
    assert request == CreateRequest(id="new", resource="chat", resource_id="p1", title="T")


@pytest.mark.parametrize("request_id", [0, 1, -5, 2**63, "x", "x" * MAX_ID_LENGTH, "é"])
def test_valid_ids_are_kept_unchanged(request_id: Any) -> None:
    request = decode(frame(id=request_id, type="auth", pin="1"))
    assert request.id == request_id
    assert type(request.id) is type(request_id)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            frame(id="a", type="auth", pin="1", extra=1, resource="chat", sinceSeq="x"),
            AuthRequest(id="a", pin="1"),
        ),
        (
            frame(
                id="s", type="subscribe", resource="chat", resourceId="c1",
                pin=5, message=[1], data={"k": "v"}, ts=1700000000,
            ),
            SubscribeRequest(id="s", resource="chat", resource_id="c1"),
        ),
        (
            frame(id="u", type="unsubscribe", resource="project", resourceId="p", sinceSeq=3),
            UnsubscribeRequest(id="u", resource="project", resource_id="p"),
        ),
        (
            frame(id="m", type="send", resourceId="c1", message="x", resource="project", n=None),
            SendRequest(id="m", resource_id="c1", message="x"),
        ),
        (
            frame(
                id="c", type="create", resource="chat", resourceId="p", message={"title": "T"},
                title=5, pin=7,
            ),
            CreateRequest(id="c", resource="chat", resource_id="p", title="T"),
        ),
    ],
)
def test_unknown_and_irrelevant_fields_are_ignored(text: str, expected: Request) -> None:
    assert decode(text) == expected


def test_create_ignores_a_top_level_title() -> None:
    # The title travels in ``message``; a top-level ``title`` is not part of the wire and, like
    # any unknown field, must be ignored (not used, not rejected).
    assert decode(
        frame(id="c", type="create", resource="chat", resourceId="p", title="top")
    ) == CreateRequest(id="c", resource="chat", resource_id="p", title=None)
    assert decode(
        frame(id="c", type="create", resource="chat", resourceId="p", title=5)
    ) == CreateRequest(id="c", resource="chat", resource_id="p", title=None)


def test_valid_surrogate_pair_escapes_decode() -> None:
    request = decode('{"id":"a","type":"send","resourceId":"c1","message":"\\ud83d\\ude00"}')
    assert request == SendRequest(id="a", resource_id="c1", message="😀")


def test_escaped_backslash_before_u_is_not_a_surrogate() -> None:
    # ``\\ud800`` in JSON is a backslash followed by "ud800": plain text, not an escape.
    request = decode('{"id":"a","type":"send","resourceId":"c1","message":"\\\\ud800"}')
    assert request == SendRequest(id="a", resource_id="c1", message="\\ud800")


def test_reprs_keep_secrets_out_of_logs() -> None:
    auth = decode(frame(id="a", type="auth", pin="98765"))
    assert "98765" not in repr(auth)
    assert "98765" not in str(auth)
    send = decode(frame(id="s", type="send", resourceId="c1", message={"text": "top-secret"}))
    assert "top-secret" not in repr(send)
    assert "c1" in repr(send)


def test_a_wrongly_typed_pin_is_not_echoed() -> None:
    wire = bad(frame(id="a", type="auth", pin=987654))
    assert "987654" not in json.dumps(wire)


# --- decoding: bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", " ", "{", "hello", "{'id': 'a'}", '{"id": "a",}', '{"id": "a"} {}', "\x00", "[1,]", "ü"],
)
def test_not_json(text: str) -> None:
    assert bad(text) == error(None, NOT_JSON)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    assert bad(f'{{"id":"a","type":"auth","pin":{constant}}}') == error(None, NOT_JSON)
    assert bad(f'{{"id":{constant},"type":"auth","pin":"1"}}') == error(None, NOT_JSON)
    assert bad(
        f'{{"id":"a","type":"send","resourceId":"c1","message":{{"x":[{constant}]}}}}'
    ) == error(None, NOT_JSON)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1E400"])
def test_numbers_that_overflow_to_infinity_are_rejected(number: str) -> None:
    # Python parses 1e999 as inf; relayed on, it would be encoded as ``Infinity``, which no
    # browser's JSON.parse accepts. It must be refused like the literal Infinity.
    wire = bad(f'{{"id":"a","type":"send","resourceId":"c1","message":{{"n":{number}}}}}')
    assert wire["code"] == "bad_request"


@pytest.mark.parametrize("text", ["[]", '[{"id":"a","type":"auth"}]', '"auth"', "1", "1.5", "null",
                                  "true", "false"])
def test_not_an_object(text: str) -> None:
    assert bad(text) == error(None, NOT_OBJECT)


@pytest.mark.parametrize(
    "request_id",
    [True, False, None, 1.0, 1.5, "", "x" * (MAX_ID_LENGTH + 1), {}, {"a": 1}, [], ["a"]],
)
def test_invalid_id(request_id: Any) -> None:
    assert bad(frame(id=request_id, type="auth", pin="1")) == error(None, BAD_ID)


def test_missing_id() -> None:
    assert bad(frame(type="auth", pin="1")) == error(None, BAD_ID)
    assert bad("{}") == error(None, BAD_ID)


@pytest.mark.parametrize("request_id", ["q-1", 7])
@pytest.mark.parametrize("request_type", [None, "", "AUTH", "ping", "data", "error", 5, ["auth"]])
def test_missing_or_unknown_type_echoes_the_id(request_id: Any, request_type: Any) -> None:
    fields: dict[str, Any] = {"id": request_id, "pin": "1"}
    if request_type is not None:
        fields["type"] = request_type
    assert bad(json.dumps(fields)) == error(request_id, BAD_TYPE)


@pytest.mark.parametrize("request_type", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("resource", ["projects", "Chat", "model_profiles", "", 1, None, ["chat"]])
def test_unknown_resource(request_type: str, resource: Any) -> None:
    wire = bad(frame(id="r", type=request_type, resource=resource, resourceId="x"))
    assert wire == error("r", BAD_RESOURCE)


@pytest.mark.parametrize("request_type", ["subscribe", "unsubscribe"])
def test_missing_resource(request_type: str) -> None:
    wire = bad(frame(id="r", type=request_type, resourceId="x"))
    assert wire == error("r", "field 'resource' is required")


@pytest.mark.parametrize("request_type", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("resource", ["project", "chat"])
@pytest.mark.parametrize("resource_id", [None, ""])
def test_missing_resource_id_for_project_and_chat(
    request_type: str, resource: str, resource_id: str | None
) -> None:
    fields: dict[str, Any] = {"id": "r", "type": request_type, "resource": resource}
    if resource_id is not None:
        fields["resourceId"] = resource_id
    wire = bad(json.dumps(fields))
    assert wire == error("r", f"field 'resourceId' is required for resource '{resource}'")


@pytest.mark.parametrize("resource_id", [None, ""])
def test_missing_resource_id_for_send(resource_id: str | None) -> None:
    fields: dict[str, Any] = {"id": "s", "type": "send", "message": "hi"}
    if resource_id is not None:
        fields["resourceId"] = resource_id
    assert bad(json.dumps(fields)) == error("s", "field 'resourceId' is required")


@pytest.mark.parametrize("resource_id", [None, ""])
def test_missing_resource_id_for_create(resource_id: str | None) -> None:
    fields: dict[str, Any] = {"id": "c", "type": "create", "resource": "chat", "message": {}}
    if resource_id is not None:
        fields["resourceId"] = resource_id
    assert bad(json.dumps(fields)) == error("c", "field 'resourceId' is required")


@pytest.mark.parametrize("resource_id", [5, 0, 1.5, True, ["c1"], {"id": "c1"}])
@pytest.mark.parametrize(
    "fields",
    [
        {"type": "subscribe", "resource": "chat"},
        {"type": "subscribe", "resource": "project"},
        {"type": "subscribe", "resource": "modelProfiles"},
        {"type": "unsubscribe", "resource": "chat"},
        {"type": "send", "message": "hi"},
        {"type": "create", "resource": "chat", "message": {"title": "T"}},
    ],
)
def test_resource_id_must_be_a_string(resource_id: Any, fields: dict[str, Any]) -> None:
    wire = bad(json.dumps({"id": "x", "resourceId": resource_id, **fields}))
    assert wire == error("x", "field 'resourceId' must be a string")


@pytest.mark.parametrize("pin", [1234, 0, 12.5, True, ["1234"], {"pin": "1234"}])
def test_pin_must_be_a_string(pin: Any) -> None:
    assert bad(frame(id="a", type="auth", pin=pin)) == error("a", "field 'pin' must be a string")


ONE_SECRET = "exactly one of the fields 'pin' and 'token' is required"
BAD_NAME = ("field 'deviceName' must be 1 to 64 characters (after trimming), without control"
            " characters")


def test_pin_or_token_is_required() -> None:
    assert bad(frame(id="a", type="auth")) == error("a", ONE_SECRET)
    assert bad(frame(id="a", type="auth", pin=None)) == error("a", ONE_SECRET)
    assert bad(frame(id="a", type="auth", pin="1", token="t")) == error("a", ONE_SECRET)
    assert bad(frame(id="a", type="auth", token=5)) == error("a", "field 'token' must be a string")


def test_auth_with_a_token_or_a_device_name() -> None:
    # The seed's sign-in is unchanged; the new fields are optional.
    assert decode(frame(id=1, type="auth", pin="1234")) == AuthRequest(id=1, pin="1234")
    assert decode(frame(id=1, type="auth", token="tok")) == AuthRequest(id=1, token="tok")
    named = decode(frame(id=1, type="auth", pin="1234", deviceName="  Firefox on Android "))
    assert named == AuthRequest(id=1, pin="1234", device_name="Firefox on Android")
    # With a token the name is ignored, whatever it is.
    ignored = decode(frame(id=1, type="auth", token="tok", deviceName=""))
    assert ignored == AuthRequest(id=1, token="tok")
    # Secrets never show in a repr (nor, so, in a log line).
    assert "1234" not in repr(named) and "tok" not in repr(ignored)


@pytest.mark.parametrize(
    "name", ["", "   ", "x" * 65, "tab\there", "new\nline", "bell\x07", "\u202eevil", "a\u2028b"]
)
def test_device_name_is_checked(name: str) -> None:
    assert bad(frame(id="a", type="auth", pin="1", deviceName=name)) == error("a", BAD_NAME)


def test_device_name_limits() -> None:
    assert decode(frame(id="a", type="auth", pin="1", deviceName="é" * 64)) == AuthRequest(
        id="a", pin="1", device_name="é" * 64)
    assert bad(frame(id="a", type="auth", pin="1", deviceName=7)) == error(
        "a", "field 'deviceName' must be a string")


def test_encode_locked_out() -> None:
    wire = strict_loads(encode(AuthFailed(
        id="a", error="Too many failed attempts; try again in 10 minutes",
        code=ErrorCode.LOCKED_OUT, retry_after=600)))
    assert wire == {"id": "a", "type": "auth_failed",
                    "error": "Too many failed attempts; try again in 10 minutes",
                    "code": "locked_out", "retryAfter": 600}


@pytest.mark.parametrize("since", [-1, -(2**70), True, False, "3", "", 1.0, 2.5, [1], {"seq": 1}])
def test_since_seq_must_be_a_non_negative_integer(since: Any) -> None:
    wire = bad(frame(id="s", type="subscribe", resource="chat", resourceId="c1", sinceSeq=since))
    assert wire == error("s", "field 'sinceSeq' must be a non-negative integer")


@pytest.mark.parametrize("title", [5, 1.5, True, ["T"], {"text": "T"}])
def test_create_title_must_be_a_string(title: Any) -> None:
    wire = bad(
        frame(id="c", type="create", resource="chat", resourceId="p", message={"title": title})
    )
    assert wire == error("c", "field 'message.title' must be a string")


@pytest.mark.parametrize("message", ["title", 5, True, ["title"], ""])
def test_create_message_must_be_an_object(message: Any) -> None:
    wire = bad(frame(id="c", type="create", resource="chat", resourceId="p", message=message))
    assert wire == error("c", 'field \'message\' must be an object such as {"title": ...}')


@pytest.mark.parametrize("resource", ["project", "modelProfiles", "Chat", 1, None])
def test_create_is_for_chats_only(resource: Any) -> None:
    wire = bad(frame(id="c", type="create", resource=resource, resourceId="p", message={}))
    assert wire == error("c", "field 'resource' must be 'chat' (only chats can be created)")


def test_create_requires_a_resource() -> None:
    wire = bad(frame(id="c", type="create", resourceId="p", message={}))
    assert wire == error("c", "field 'resource' is required")


@pytest.mark.parametrize("message", [None, "", {}])
def test_send_message_must_not_be_empty(message: Any) -> None:
    wire = bad(frame(id="s", type="send", resourceId="c1", message=message))
    assert wire == error("s", "field 'message' must not be empty")


def test_send_message_is_required() -> None:
    wire = bad(frame(id="s", type="send", resourceId="c1"))
    assert wire == error("s", "field 'message' is required")


@pytest.mark.parametrize(
    "text",
    [
        '{"id":"a","type":"send","resourceId":"c1","message":"\\ud800"}',
        '{"id":"a","type":"send","resourceId":"c1","message":"x\\uDFFFy"}',
        '{"id":"a","type":"send","resourceId":"c1","message":"\\ude00\\ud83d"}',
        '{"id":"a","type":"send","resourceId":"c1","message":{"\\udbff":1}}',
        '{"id":"a","type":"send","resourceId":"c1","message":[1,["\\udc80"]]}',
        '{"id":"a\\ud800","type":"auth","pin":"1"}',
        '{"id":"a","type":"auth","pin":"\\uD83D"}',
        '{"id":"a","type":"subscribe","resource":"chat","resourceId":"\\ud800"}',
        '{"id":"a","type":"auth","pin":"1","junk":"\\ud800"}',
    ],
)
def test_lone_surrogate_escapes(text: str) -> None:
    # Such a string can never be encoded back to UTF-8, so the id cannot be echoed either.
    assert bad(text) == error(None, LONE_SURROGATE)


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_json(opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    depth = 100_000
    assert bad(opener * depth) == error(None, NOT_JSON)
    assert bad(opener * depth + "1" + closer * depth) == error(None, NOT_JSON)
    nested_message = opener * depth + "1" + closer * depth
    text = '{"id":"a","type":"send","resourceId":"c1","message":' + nested_message + "}"
    assert bad(text) == error(None, NOT_JSON)


@pytest.mark.parametrize("opener", ["[", '{"k":'])
@pytest.mark.parametrize("depth", [400, 700, 950])
def test_nested_json_with_a_lone_surrogate_is_refused_not_crashed(opener: str, depth: int) -> None:
    # Shallow enough for json.loads, but the surrogate check must not overflow the stack.
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + '"\\ud800"' + closer * depth
    text = '{"id":"a","type":"send","resourceId":"c1","message":' + nested + "}"
    wire = bad(text)
    assert wire["id"] is None
    assert wire["code"] == "bad_request"


def test_huge_integers() -> None:
    digits = "9" * 5000  # beyond Python's int/str conversion limit
    assert bad('{"id":' + digits + ',"type":"auth","pin":"1"}') == error(None, NOT_JSON)
    assert bad(
        '{"id":"s","type":"subscribe","resource":"chat","resourceId":"c","sinceSeq":'
        + digits + "}"
    ) == error(None, NOT_JSON)
    assert bad(
        '{"id":"m","type":"send","resourceId":"c","message":' + digits + "}"
    ) == error(None, NOT_JSON)
    # Big but parseable integers are integers like any other.
    big = 10**40
    assert decode(frame(id=big, type="auth", pin="1")).id == big
    request = decode(frame(id="s", type="subscribe", resource="chat", resourceId="c", sinceSeq=big))
    assert isinstance(request, SubscribeRequest)
    assert request.since_seq == big
    assert bad(frame(id=-big, type="nope")) == error(-big, BAD_TYPE)


def test_error_reply_echoes_an_integer_id_as_an_integer() -> None:
    text = encode(bad_reply(frame(id=42, type="subscribe", resource="chat")))
    assert text == (
        '{"id":42,"type":"error",'
        '"error":"field \'resourceId\' is required for resource \'chat\'","code":"bad_request"}'
    )


def bad_reply(text: str) -> ErrorReply:
    with pytest.raises(ProtocolError) as info:
        decode(text)
    return info.value.reply


# --- encoding ---------------------------------------------------------------------------------

PROJECTS = [{"id": "p1", "name": "Demo", "path": "/home/u/demo"}]
PROFILES = [{"id": "mp1", "name": "Default", "model": "m-1"}]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (AuthRequired(), {"id": None, "type": "auth_required"}),
        (
            AuthSuccess(id="a", data={"projects": PROJECTS, "modelProfiles": PROFILES}),
            {
                "id": "a", "type": "auth_success",
                "data": {"projects": PROJECTS, "modelProfiles": PROFILES},
            },
        ),
        (
            Subscribed(
                id="sub-proj-1", resource="project", resource_id="p1",
                data={"chats": [{"id": "c1", "title": "Chat"}]}, seq=0,
            ),
            {
                "id": "sub-proj-1", "type": "subscribed", "resource": "project",
                "resourceId": "p1", "data": {"chats": [{"id": "c1", "title": "Chat"}]}, "seq": 0,
            },
        ),
        (
            Subscribed(
                id="sub-chat-1", resource="chat", resource_id="c1",
                data={"messages": [{"id": "m1", "content": "hi"}]}, seq=12,
            ),
            {
                "id": "sub-chat-1", "type": "subscribed", "resource": "chat", "resourceId": "c1",
                "data": {"messages": [{"id": "m1", "content": "hi"}]}, "seq": 12,
            },
        ),
        (
            Subscribed(id=3, resource="modelProfiles", data={"modelProfiles": PROFILES}, seq=1),
            {
                "id": 3, "type": "subscribed", "resource": "modelProfiles",
                "data": {"modelProfiles": PROFILES}, "seq": 1,
            },
        ),
        (
            Subscribed(
                id="s", resource="chat", resource_id="c1", data={"messages": [], "reset": True},
                seq=7,
            ),
            {
                "id": "s", "type": "subscribed", "resource": "chat", "resourceId": "c1",
                "data": {"messages": [], "reset": True}, "seq": 7,
            },
        ),
        (
            DataReply(id="send-1", resource="chat", resource_id="c1", data={"sent": True}),
            {
                "id": "send-1", "type": "data", "resource": "chat", "resourceId": "c1",
                "data": {"sent": True},
            },
        ),
        (
            DataReply(id=None, resource="chat", resource_id="c1",
                      data={"type": "message", "message": {"id": "m2"}}, seq=13),
            {
                "id": None, "type": "data", "resource": "chat", "resourceId": "c1",
                "data": {"type": "message", "message": {"id": "m2"}}, "seq": 13,
            },
        ),
        (
            DataReply(id=None, resource="chat", resource_id="c1", data={"completed": True},
                      seq=0),
            {
                "id": None, "type": "data", "resource": "chat", "resourceId": "c1",
                "data": {"completed": True}, "seq": 0,
            },
        ),
        (
            DataReply(id=None, resource="project", resource_id="p1",
                      data={"type": "chat_created", "chat": {"id": "c2"}}, seq=2),
            {
                "id": None, "type": "data", "resource": "project", "resourceId": "p1",
                "data": {"type": "chat_created", "chat": {"id": "c2"}}, "seq": 2,
            },
        ),
        (
            DataReply(id=None, resource="modelProfiles", data={"modelProfiles": []}, seq=4),
            {
                "id": None, "type": "data", "resource": "modelProfiles",
                "data": {"modelProfiles": []}, "seq": 4,
            },
        ),
        (
            DataReply(id="u", resource="chat", resource_id="c1", data={"unsubscribed": True}),
            {
                "id": "u", "type": "data", "resource": "chat", "resourceId": "c1",
                "data": {"unsubscribed": True},
            },
        ),
        (
            DataReply(id="u", resource="project", resource_id="p9",
                      data={"unsubscribed": False}),
            {
                "id": "u", "type": "data", "resource": "project", "resourceId": "p9",
                "data": {"unsubscribed": False},
            },
        ),
        (
            DataReply(id="new", resource="chat", resource_id="c3",
                      data={"chat": {"id": "c3", "title": None}}),
            {
                "id": "new", "type": "data", "resource": "chat", "resourceId": "c3",
                "data": {"chat": {"id": "c3", "title": None}},
            },
        ),
        (
            ErrorReply(id="x", error="Not authenticated", code="not_authenticated"),
            {"id": "x", "type": "error", "error": "Not authenticated", "code": "not_authenticated"},
        ),
        (
            ErrorReply(id=None, error="frame is not valid JSON", code="bad_request"),
            {
                "id": None, "type": "error", "error": "frame is not valid JSON",
                "code": "bad_request",
            },
        ),
        (
            ErrorReply(id="s", error="no such chat", code="not_found", resource="chat",
                       resource_id="c404"),
            {
                "id": "s", "type": "error", "error": "no such chat", "code": "not_found",
                "resource": "chat", "resourceId": "c404",
            },
        ),
    ],
)
def test_encode(reply: Reply, expected: dict[str, Any]) -> None:
    text = encode(reply)
    wire = strict_loads(text)
    assert wire == expected
    assert list(wire)[:2] == ["id", "type"]
    assert "resource_id" not in wire
    assert "since_seq" not in wire
    assert text == json.dumps(wire, ensure_ascii=False, separators=(",", ":"))  # compact


@pytest.mark.parametrize("error_text", ["Invalid PIN", "Too many failed attempts"])
def test_encode_auth_failed_carries_its_code(error_text: str) -> None:
    # Every error carries a machine-readable ``code`` (contract, extension ``code``).
    wire = strict_loads(encode(AuthFailed(id="a", error=error_text)))
    assert wire == {"id": "a", "type": "auth_failed", "error": error_text, "code": "auth_failed"}


def test_encode_exact_text() -> None:
    # The relay's first frame, byte for byte; key order elsewhere is not part of the contract.
    assert encode(AuthRequired()) == '{"id":null,"type":"auth_required"}'
    assert encode(AuthRequired(id="a")) == '{"id":"a","type":"auth_required"}'


def test_encode_leaves_data_untouched() -> None:
    # Only the frame's own fields are renamed; what the backend returned is relayed as is.
    data = {"resource_id": 1, "model_profiles": [], "modelProfiles": [], "id": None, "n": 1.5}
    wire = strict_loads(encode(DataReply(id=None, resource="chat", resource_id="c", data=data)))
    assert wire["data"] == data


def test_encode_keeps_non_ascii_as_utf8() -> None:
    reply = DataReply(id=None, resource="chat", resource_id="c-é",
                      data={"type": "chunk", "text": "héllo 世界 😀"}, seq=1)
    text = encode(reply)
    assert "héllo 世界 😀" in text
    assert '"resourceId":"c-é"' in text
    assert "\\u" not in text
    assert strict_loads(text.encode("utf-8").decode("utf-8"))["data"]["text"] == "héllo 世界 😀"


def test_encode_escapes_a_lone_surrogate_instead_of_failing() -> None:
    reply = DataReply(id=None, resource="chat", resource_id="c1",
                      data={"text": "a\ud800b", "ok": "é"}, seq=1)
    text = encode(reply)
    text.encode("utf-8")  # does not raise
    assert "\\ud800" in text
    assert strict_loads(text)["data"] == {"text": "a\ud800b", "ok": "é"}


def test_protocol_error_carries_its_reply() -> None:
    reply = ErrorReply(id="a", error="field 'x' is bad", code="bad_request")
    exc = ProtocolError(reply)
    assert exc.reply is reply
    assert str(exc) == "field 'x' is bad"


def test_resources() -> None:
    assert RESOURCES == ("project", "chat", "modelProfiles")


# --- properties -------------------------------------------------------------------------------

FIELD_NAMES = ["id", "type", "resource", "resourceId", "message", "pin", "sinceSeq"]
TYPES = ["auth", "subscribe", "unsubscribe", "send", "create"]

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def check_outcome(text: str) -> Request | None:
    """Decode ``text``: a request, or a ProtocolError whose reply is a valid error frame."""
    try:
        return decode(text)
    except ProtocolError as exc:
        wire = strict_loads(encode(exc.reply))
        assert wire["type"] == "error"
        assert wire["code"] == "bad_request"
        assert isinstance(wire["error"], str) and wire["error"]
        assert "id" in wire
        return None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_only_raises_protocol_error(text: str) -> None:
    check_outcome(text)


@settings(max_examples=200, deadline=None)
@given(json_values, st.booleans())
def test_arbitrary_json_only_raises_protocol_error(value: Any, ascii_only: bool) -> None:
    check_outcome(json.dumps(value, ensure_ascii=ascii_only))


field_values: dict[str, st.SearchStrategy[Any]] = {
    "id": st.one_of(st.text(max_size=3), st.integers(), json_values),
    "type": st.one_of(st.sampled_from(TYPES), json_values),
    "resource": st.one_of(st.sampled_from([*RESOURCES, "projects"]), json_values),
    "resourceId": st.one_of(st.text(max_size=3), json_values),
    "message": st.one_of(
        st.fixed_dictionaries({}, optional={"title": json_values, "message": json_values}),
        json_values,
    ),
    "pin": st.one_of(st.text(max_size=6), json_values),
    "sinceSeq": st.one_of(st.integers(), json_values),
}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional=field_values), st.dictionaries(st.text(), json_values,
                                                                           max_size=2))
def test_requests_from_real_field_names(fields: dict[str, Any], extra: dict[str, Any]) -> None:
    raw = {**extra, **fields}
    try:
        text = json.dumps(raw)
    except ValueError:  # pragma: no cover - json.dumps accepts everything generated
        return
    try:
        request = decode(text)
    except ProtocolError as exc:
        wire = strict_loads(encode(exc.reply))
        assert wire["type"] == "error"
        assert wire["code"] == "bad_request"
        # The id is echoed exactly when it is a valid one (and the frame otherwise parsed).
        if wire["id"] is not None:
            assert wire["id"] == raw["id"]
        elif "NaN" not in text and "Infinity" not in text:  # else the frame is not JSON
            assert not valid_id(raw.get("id")), f"valid id not echoed: {wire}"
        return
    assert request.id == raw["id"]
    assert request.type == raw["type"]
    if isinstance(request, (SubscribeRequest, UnsubscribeRequest)):
        if request.resource == "modelProfiles":
            assert request.resource_id == ""
        else:
            assert request.resource_id == raw["resourceId"] != ""
    elif isinstance(request, SendRequest):
        assert request.resource_id == raw["resourceId"] != ""
        assert request.message == raw["message"]
        assert request.message not in (None, "", {})
    elif isinstance(request, CreateRequest):
        assert request.resource == "chat"
        assert request.resource_id == raw["resourceId"] != ""
    else:
        assert isinstance(request, AuthRequest)
        assert request.pin == raw["pin"]


request_ids: st.SearchStrategy[Any] = st.one_of(
    st.integers(), st.text(min_size=1, max_size=MAX_ID_LENGTH)
)
finite_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
resource_ids = st.text(min_size=1, max_size=20)


def keyed(cls: type[SubscribeRequest] | type[UnsubscribeRequest]) -> st.SearchStrategy[Request]:
    extra = {"since_seq": st.none() | st.integers(min_value=0)} if cls is SubscribeRequest else {}
    return st.one_of(
        st.builds(cls, id=request_ids, resource=st.sampled_from(["project", "chat"]),
                  resource_id=resource_ids, **extra),
        st.builds(cls, id=request_ids, resource=st.just("modelProfiles"), resource_id=st.just(""),
                  **extra),
    )


valid_requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(AuthRequest, id=request_ids, pin=st.text()),
    keyed(SubscribeRequest),
    keyed(UnsubscribeRequest),
    st.builds(
        SendRequest, id=request_ids, resource_id=resource_ids,
        message=finite_json.filter(lambda m: m not in (None, "", {})),
    ),
    st.builds(
        CreateRequest, id=request_ids, resource=st.just("chat"), resource_id=resource_ids,
        title=st.none() | st.text(),
    ),
)


def to_wire(request: Request, include_empty: bool) -> dict[str, Any]:
    """The frame a client would send for ``request``, written out by hand."""
    wire: dict[str, Any] = {"id": request.id, "type": request.type}
    if isinstance(request, AuthRequest):
        wire["pin"] = request.pin
    elif isinstance(request, (SubscribeRequest, UnsubscribeRequest)):
        wire["resource"] = request.resource
        if request.resource_id or include_empty:
            wire["resourceId"] = request.resource_id
        if isinstance(request, SubscribeRequest) and request.since_seq is not None:
            wire["sinceSeq"] = request.since_seq
    elif isinstance(request, SendRequest):
        wire["resourceId"] = request.resource_id
        wire["message"] = request.message
    elif isinstance(request, CancelRequest):
        wire["resourceId"] = request.resource_id
    else:
        wire["resource"] = request.resource
        wire["resourceId"] = request.resource_id
        if request.title is not None:
            wire["message"] = {"title": request.title}
        elif include_empty:
            wire["message"] = {}
    return wire


@settings(max_examples=300, deadline=None)
@given(valid_requests, st.booleans(), st.booleans())
def test_round_trip(request: Request, include_empty: bool, ascii_only: bool) -> None:
    text = json.dumps(to_wire(request, include_empty), ensure_ascii=ascii_only, allow_nan=False)
    assert decode(text) == request


def test_create_carries_the_model_profile_inside_message() -> None:
    request = decode(
        '{"id":"c","type":"create","resource":"chat","resourceId":"p1",'
        '"message":{"title":"T","modelProfileId":"echo-fast"},"modelProfileId":"ignored"}'
    )
    assert request == CreateRequest(
        id="c", resource="chat", resource_id="p1", title="T", model_profile_id="echo-fast"
    )
    with pytest.raises(ProtocolError) as bad:
        decode('{"id":"c","type":"create","resource":"chat","resourceId":"p1",'
               '"message":{"modelProfileId":7}}')
    assert bad.value.reply.error == "field 'message.modelProfileId' must be a string"
