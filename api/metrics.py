"""Prometheus metrics of the API: requests, latencies per model, queue depth, 429s, cancels."""

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter("chatq_requests_total", "Chat requests by model and outcome", ["model", "outcome"])
HTTP_REQUESTS = Counter(
    "chatq_http_requests_total",
    "HTTP responses by method, route and status (every routed request)",
    ["method", "route", "status"],
)
TTFT = Histogram("chatq_ttft_seconds", "Request accepted to first token sent", ["model"], buckets=_LATENCY)
ITL = Histogram(
    "chatq_inter_token_seconds",
    "Time per output token: the gap between chunks, divided by the chunk's tokens",
    ["model"],
    buckets=_ITL,
)
E2E = Histogram("chatq_e2e_seconds", "Request accepted to last token sent", ["model"], buckets=_LATENCY)
QUEUE_DEPTH = Gauge("chatq_queue_depth", "Jobs waiting for a worker", ["model"])
REJECTED = Counter("chatq_rejected_total", "Requests refused with 429, by reason", ["model", "reason"])
CANCELLED = Counter("chatq_cancellations_total", "Streams cancelled, by reason", ["model", "reason"])
POLICY_REFUSALS = Counter(
    "chatq_policy_refusals_total", "Requests refused by a content policy", ["policy", "direction"]
)
ACTIVE_STREAMS = Gauge("chatq_active_streams", "Streams being relayed now")


def count_responses(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: count every routed response in chatq_http_requests_total."""

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                HTTP_REQUESTS.labels(
                    method=scope["method"],
                    # The route's template (/api/conversations/{conversation_id:str}), never
                    # the raw path, so ids do not make a series each.
                    route=scope.get("path_template") or "-",
                    status=str(message["status"]),
                ).inc()
            await send(message)

        await app(scope, receive, send_counted)

    return counted
