"""A faithful local fake of Genesys Cloud (OAuth, REST, notification WebSockets) with fault
injection, for tests, demos and benchmarks.

    from daemon.sandbox import Sandbox
    async with Sandbox(heartbeat_interval=1.0) as sb:        # 127.0.0.1, ephemeral port
        q = sb.world.create_queue("Sales"); u = sb.world.create_user("Ann")
        conv = sb.world.start_call(q.id)                      # customer + acd
        agent = sb.world.connect_agent(conv.id, u.id)         # acd leaves (transfer)
        ext = sb.world.add_external(conv.id)                  # now a conference
        sb.faults.configure({"lose": {"next": 1}})            # lose the next event
        ... sb.journal.patches(conv.id) ...                   # which PATCHes arrived, when

One origin (`sb.base_url`) serves /oauth/token, /api/v2/..., the /channels/{id} WebSockets
and the unauthenticated test driver /sandbox/... (see `scenario` for its ops).
Synchronous use: `with Sandbox().run_in_thread() as sb: sb.call(sb.world.create_queue, "Q")`.
CLI: `confguard sandbox` or `python -m daemon.sandbox`.

Modules: world (pure state and the SDK-shaped JSON), app (aiohttp routes), faults, journal,
scenario (starting worlds and the /sandbox/ driver), server (`Sandbox`), eventbridge
(detail events into an SQS queue, as Genesys' EventBridge integration), cli.

Behaviour chosen where Genesys is not documented (documented here so tests can rely on it):
PATCH {"state":"disconnected"} on an already-disconnected party answers 202 and changes
nothing (`patch_final_status` makes it e.g. 400); a conversation forgotten (after
`ended_retention`, or `world.forget_call`) answers 404. Subscriptions with a rejected topic
fail whole without `ignoreErrors=true`: 403 naming the permission when only permission
checks failed, else 400 naming the topics. A socket `subscribe` message is answered with
{"result": "200", "correlationId", "message"} (+ "rejectedTopics"). The analytics details
query matches conversations that started within `interval` and omits `conversations` when
nothing matches. Events carry one extra unknown key `sandboxExtra<n>` (and a participant
key `sandboxExtraFlag`) unless `faults.extra_field` is False. Request budget (when on:
`request_budget`, `--budget`, the `configure {budget}` op or the `budgetPerMinute` fault):
requests per access token counted in a sliding 60 s window; no answer carries
`inin-ratelimit-*` headers (Genesys removed them in 2021); past the allowance, 429 with
`Retry-After` (seconds until the oldest counted request leaves the window), code
`too.many.requests.retry.after` and `"limit": {"key":
"client.credentials.token.rate.per.minute", "namespace": "platform.api", "value": N}`, not
counted. `GET /api/v2/organizations/limits/namespaces/platform.api` lists that limit.
Legacy mode (`legacy_ratelimit_headers`, `--legacy-ratelimit-headers`, `configure
{legacyRatelimitHeaders: true}` or the `legacyRatelimitHeaders` fault): a fixed 60 s window
per token from its first /api/v2 request, and every /api/v2 answer to a valid token (errors
included) carries `inin-ratelimit-count`, `-allowed` and `-reset` (whole seconds to the
reset, rounded up); its 429 has no `limit`. Injected bursts are not counted either.
"""

from daemon.sandbox.server import Sandbox

__all__ = ["Sandbox"]
