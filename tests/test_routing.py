"""gateway.routing: template syntax, matching on the raw path, refused captures, overlaps.

Every call an official client makes must be routable with the shipped `config/local.yaml`;
the last table checks that against the very router `gateway serve` builds from that file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.routing import (
    MAX_CAPTURE_LENGTH,
    RECENT_PATH_MAX_LENGTH,
    RECENT_PATHS,
    RefusedCapture,
    Route,
    RouteMatch,
    Router,
    TemplateError,
    split_template,
    templates_ambiguous,
)
from gateway.settings import load_settings

REPO = Path(__file__).resolve().parent.parent

LP_INVOKE = "/api/account/{account}/lambdas/{function}/invoke"
LP_EVENT = "/api/account/{account}/events/{function}/invoke"
LP_IMPLEMENTED = "/api/account/{account}/events/{function}/isImplemented"
LP_LIST_V1 = "/api/account/{account}/lambdas/"
LP_LIST_V2 = "/api/account/{account}/functions"
LAMBDA = "/2015-03-31/functions/{function}/invocations"
STEDI = "/2021-11-16/functions/{function}/invocations"
YR_LONG = "/serverless/v1/functions/{function}/invocations"
YR_SHORT = "/invocations/{account}/{*}/{function}/"
YR_SHORT_NO_SLASH = "/invocations/{account}/{*}/{function}"
WEB = "/web/{function}"

TEMPLATES = {
    LP_INVOKE: "lp", LP_EVENT: "lp", LP_IMPLEMENTED: "lp", LP_LIST_V1: "lp", LP_LIST_V2: "lp",
    LAMBDA: "aws", STEDI: "aws", YR_LONG: "yr", YR_SHORT: "yr", YR_SHORT_NO_SLASH: "yr", WEB: "web",
}


def build_router(templates: dict[str, str] = TEMPLATES) -> Router:
    return Router([Route(upstream, t, split_template(t)) for t, upstream in templates.items()])


# (raw path, upstream, template, account, function)
MATCHES = [
    ("/api/account/le-1234/lambdas/0f4c1c5e-7b1a-4c1e-9b8e-3f1d2a6b7c8d/invoke", "lp", LP_INVOKE, "le-1234", "0f4c1c5e-7b1a-4c1e-9b8e-3f1d2a6b7c8d"),
    ("/api/account/le-1234/events/conversation_start/invoke", "lp", LP_EVENT, "le-1234", "conversation_start"),
    ("/api/account/le-1234/events/conversation_start/isImplemented", "lp", LP_IMPLEMENTED, "le-1234", "conversation_start"),
    ("/api/account/le-1234/lambdas/", "lp", LP_LIST_V1, "le-1234", LP_LIST_V1),
    ("/api/account/le-1234/functions", "lp", LP_LIST_V2, "le-1234", LP_LIST_V2),
    ("/2015-03-31/functions/my-function/invocations", "aws", LAMBDA, None, "my-function"),
    ("/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Amy-fn/invocations", "aws", LAMBDA, None, "arn:aws:lambda:us-east-1:123456789012:function:my-fn"),
    ("/2021-11-16/functions/edi-inbound/invocations", "aws", STEDI, None, "edi-inbound"),
    ("/serverless/v1/functions/sn:cn:yrk:12345678901234561234567890123456:function:0-default-hello:$latest/invocations", "yr", YR_LONG, None, "sn:cn:yrk:12345678901234561234567890123456:function:0-default-hello:$latest"),
    ("/invocations/tenant-1/default/hello/", "yr", YR_SHORT, "tenant-1", "hello"),
    ("/invocations/tenant-1/default/hello", "yr", YR_SHORT_NO_SLASH, "tenant-1", "hello"),
    ("/web/fn%20name", "web", WEB, None, "fn name"),
    ("/web/a:b$c", "web", WEB, None, "a:b$c"),
    ("/web/" + "f" * MAX_CAPTURE_LENGTH, "web", WEB, None, "f" * MAX_CAPTURE_LENGTH),
]


@pytest.mark.parametrize(("path", "upstream", "template", "account", "function"), MATCHES, ids=[m[0][:60] for m in MATCHES])
def test_paths_match_their_route(path: str, upstream: str, template: str, account: str | None, function: str) -> None:
    found = build_router().match(path)
    assert isinstance(found, RouteMatch), found
    assert (found.route.upstream, found.route.template, found.account, found.function) == (upstream, template, account, function)


def test_a_path_seen_again_gets_the_same_answer_and_the_memory_stays_bounded() -> None:
    router = build_router()
    fresh = build_router()
    paths = [m[0] for m in MATCHES] + UNMATCHED + ["/web/..", "/web/a%2Fb"]
    first = [router.match(path) for path in paths]
    assert [router.match(path) for path in paths] == first == [fresh.match(path) for path in paths]
    assert all(again is found for again, found in zip([router.match(path) for path in paths], first, strict=True))
    for index in range(RECENT_PATHS + 10):  # a client that never calls the same function twice
        found = router.match(f"/web/fn-{index}")
        assert isinstance(found, RouteMatch) and found.function == f"fn-{index}"
    assert len(router._recent) <= RECENT_PATHS
    assert [router.match(path) for path in paths] == first
    router._recent.clear()
    for index in range(50):  # long paths (up to the head's limit) are matched, never kept
        long_path = f"/web/{index}" + "x" * RECENT_PATH_MAX_LENGTH
        assert isinstance(router.match(long_path), RefusedCapture)  # over the capture's length
    assert router._recent == {}


UNMATCHED = [
    "/",
    "",
    "nowhere",
    "/nowhere",
    "/api/account/le-1234/lambdas",  # the listing template ends with '/': an empty last segment
    "/api/account/le-1234/lambdas/fn/invoke/",
    "/api/account/le-1234/lambdas/fn/invoke/extra",
    "/api/account/le-1234/lambdas/fn",
    "/API/account/le-1234/lambdas/fn/invoke",  # literals are case-sensitive
    "/2015-03-31/functions/fn/invocations/x",
    "/invocations/tenant-1/default",
    "/web",
    "/web/a/b",
    "/healthz",
    "/admin/breakers",
]


@pytest.mark.parametrize("path", UNMATCHED)
def test_paths_without_a_route(path: str) -> None:
    assert build_router().match(path) is None


REFUSED = [
    ("/web/..", "{function} is empty or a dot segment"),
    ("/web/.", "{function} is empty or a dot segment"),
    ("/web/%2e%2e", "{function} is empty or a dot segment"),
    ("/web/%2E%2E", "{function} is empty or a dot segment"),
    ("/web/", "{function} is empty or a dot segment"),
    ("/web/a%2fb", "{function} contains a slash or backslash"),
    ("/web/a%2Fb", "{function} contains a slash or backslash"),
    ("/web/a%5cb", "{function} contains a slash or backslash"),
    ("/web/a\\b", "{function} contains a slash or backslash"),
    ("/web/a%00b", "{function} contains control characters"),
    ("/web/a%0d%0ab", "{function} contains control characters"),
    ("/web/a%7fb", "{function} contains control characters"),
    ("/web/" + "f" * (MAX_CAPTURE_LENGTH + 1), f"{{function}} is longer than {MAX_CAPTURE_LENGTH} characters"),
    ("/web/" + "%41" * (MAX_CAPTURE_LENGTH + 1), f"{{function}} is longer than {MAX_CAPTURE_LENGTH} characters"),
    ("/api/account/../lambdas/fn/invoke", "{account} is empty or a dot segment"),
    ("/api/account/%2e%2e/lambdas/fn/invoke", "{account} is empty or a dot segment"),
    ("/api/account/a%2Fb/lambdas/", "{account} contains a slash or backslash"),
    ("/invocations/t%09x/default/hello/", "{account} contains control characters"),
]


@pytest.mark.parametrize(("path", "reason"), REFUSED, ids=[r[0][:40] for r in REFUSED])
def test_refused_captures_say_why(path: str, reason: str) -> None:
    found = build_router().match(path)
    assert isinstance(found, RefusedCapture), found
    assert found.reason == reason


def test_a_template_ending_in_a_slash_needs_the_slash() -> None:
    """`{*}` then `{function}` then `/`: the trailing empty segment is part of the template."""
    router = build_router({YR_SHORT: "yr"})
    found = router.match("/invocations/tenant-1/default/hello/")
    assert isinstance(found, RouteMatch) and (found.account, found.function) == ("tenant-1", "hello")
    assert router.match("/invocations/tenant-1/default/hello") is None
    assert router.match("/invocations/tenant-1/default/hello//") is None
    assert isinstance(router.match("/invocations/tenant-1/default//"), RefusedCapture)


def test_the_wildcard_is_neither_captured_nor_checked() -> None:
    found = build_router().match("/invocations/tenant-1/%2e%2e/hello/")
    assert isinstance(found, RouteMatch)
    assert (found.account, found.function) == ("tenant-1", "hello")


def test_a_literal_beats_a_capture_at_the_same_depth() -> None:
    router = build_router({"/a/{function}/x": "one", "/a/list/y": "two"})
    assert router.match("/a/list/y").route.upstream == "two"  # type: ignore[union-attr]
    assert router.match("/a/list/x").route.upstream == "one"  # type: ignore[union-attr]


TEMPLATE_ERRORS = [
    ("api/x", "a route must start with '/'"),
    ("/a?b=1", "a route is a path: no query or fragment"),
    ("/a#b", "a route is a path: no query or fragment"),
    ("/a/{tenant}", "unknown capture {tenant}: use {account}, {function} or {*}"),
    ("/a/{}", "unknown capture {}: use {account}, {function} or {*}"),
    ("/a/{function}x", "a capture must be a whole segment: '{function}x'"),
    ("/a/x{account}", "a capture must be a whole segment: 'x{account}'"),
    ("/a/{function}/{function}", "a capture may appear only once"),
    ("/a/{account}/{account}", "a capture may appear only once"),
    ("/admin/x", "/admin is reserved for the gateway's own endpoints"),
    ("/healthz", "/healthz is reserved for the gateway's own endpoints"),
    ("/metrics/{function}", "/metrics is reserved for the gateway's own endpoints"),
]


@pytest.mark.parametrize(("template", "message"), TEMPLATE_ERRORS)
def test_bad_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        split_template(template)
    assert str(caught.value) == message


def test_template_segments() -> None:
    assert split_template(YR_SHORT) == ("invocations", "{account}", "{*}", "{function}", "")
    assert split_template(LP_LIST_V1) == ("api", "account", "{account}", "lambdas", "")
    assert split_template("/") == ("",)


AMBIGUITIES = [
    (LP_INVOKE, LP_INVOKE, True),
    (LP_INVOKE, "/api/account/{account}/lambdas/{*}/invoke", True),
    (LP_INVOKE, "/api/account/le-1/lambdas/{function}/invoke", False),
    ("/a/{function}/x", "/a/list/{*}", False),
    ("/a/{function}/x", "/a/{*}/x", True),
    (LP_INVOKE, LP_EVENT, False),
    (LP_LIST_V1, LP_INVOKE, False),
    (YR_SHORT, YR_SHORT_NO_SLASH, False),
    (LAMBDA, STEDI, False),
]


@pytest.mark.parametrize(("a", "b", "expected"), AMBIGUITIES)
def test_ambiguity_is_symmetric(a: str, b: str, expected: bool) -> None:
    sa, sb = split_template(a), split_template(b)
    assert templates_ambiguous(sa, sb) is expected
    assert templates_ambiguous(sb, sa) is expected


# Every call an official client makes, against the router built from the shipped config.
CLIENT_CALLS = [
    ("/api/account/le-1234/lambdas/0f4c1c5e-7b1a-4c1e-9b8e-3f1d2a6b7c8d/invoke", "lp", "le-1234", "0f4c1c5e-7b1a-4c1e-9b8e-3f1d2a6b7c8d"),
    ("/api/account/le-1234/events/conversation_start/invoke", "lp", "le-1234", "conversation_start"),
    ("/api/account/le-1234/events/conversation_start/isImplemented", "lp", "le-1234", "conversation_start"),
    ("/api/account/le-1234/lambdas/", "lp", "le-1234", LP_LIST_V1),
    ("/api/account/le-1234/functions", "lp", "le-1234", LP_LIST_V2),
    ("/2015-03-31/functions/my-function/invocations", "aws", None, "my-function"),
    ("/2021-11-16/functions/edi-inbound/invocations", "aws", None, "edi-inbound"),
    ("/serverless/v1/functions/hello/invocations", "yr", None, "hello"),
    ("/invocations/tenant-1/default/hello/", "yr", "tenant-1", "hello"),
    ("/invocations/tenant-1/default/hello", "yr", "tenant-1", "hello"),
]


@pytest.mark.parametrize(("path", "upstream", "account", "function"), CLIENT_CALLS, ids=[c[0][:60] for c in CLIENT_CALLS])
def test_shipped_local_config_routes_every_client_call(path: str, upstream: str, account: str | None, function: str) -> None:
    settings = load_settings(REPO / "config" / "local.yaml")
    found = settings.router.match(path)
    assert isinstance(found, RouteMatch), found
    assert (found.route.upstream, found.account, found.function) == (upstream, account, function)


def test_the_more_specific_template_wins() -> None:
    router = Router(
        [
            Route("all", LP_INVOKE, split_template(LP_INVOKE)),
            Route("vip", "/api/account/le-1/lambdas/{function}/invoke", split_template("/api/account/le-1/lambdas/{function}/invoke")),
            Route("other", "/a/{function}/x", split_template("/a/{function}/x")),
            Route("list", "/a/list/{*}", split_template("/a/list/{*}")),
        ]
    )
    vip = router.match("/api/account/le-1/lambdas/f/invoke")
    everyone = router.match("/api/account/le-2/lambdas/f/invoke")
    assert isinstance(vip, RouteMatch) and vip.route.upstream == "vip" and vip.account is None and vip.function == "f"
    assert isinstance(everyone, RouteMatch) and everyone.route.upstream == "all" and everyone.account == "le-2"
    listed = router.match("/a/list/x")
    assert isinstance(listed, RouteMatch) and listed.route.upstream == "list"
    backtracked = router.match("/a/list/y")
    assert isinstance(backtracked, RouteMatch) and backtracked.route.upstream == "list"
    other = router.match("/a/zzz/x")
    assert isinstance(other, RouteMatch) and other.route.upstream == "other" and other.function == "zzz"
