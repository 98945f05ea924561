"""The api's app factory and entry point (`python -m api.app`, or `payments api`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from api import jobs, ledger, licenses, orchestrators, sessions, system, workloads
from api.auth import Auth
from api.context import CONTEXT, ApiContext
from api.errors import error_middleware
from api.event_store import EventStore
from api.rate_limit import RateLimiter, SlidingWindow
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.lookups import KeyLookups
from shared.gc_freeze import freeze_startup_objects
from shared.observability import configure_logging
from shared.s3 import Presigner
from shared.settings import Settings, load_settings

REGISTRATION_WINDOW_S = 60.0
REGISTRATION_BURST_WINDOW_S = 10.0
REDEEM_WINDOW_S = 60.0


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", system.healthz)
    app.router.add_get("/readyz", system.readyz)
    app.router.add_get("/metrics", system.metrics)
    app.router.add_get("/docs/openapi.json", system.openapi)
    app.router.add_get("/docs/asyncapi.json", system.asyncapi)
    app.router.add_post("/api/orchestrators/register", orchestrators.register)
    app.router.add_get("/api/orchestrators", orchestrators.list_orchestrators)
    app.router.add_get("/api/orchestrators/me", orchestrators.get_me)
    app.router.add_get("/api/orchestrators/me/stats", orchestrators.my_stats)
    app.router.add_get("/api/orchestrators/{orchestrator_id}", orchestrators.get_orchestrator)
    app.router.add_post("/api/orchestrators/{orchestrator_id}/health", orchestrators.report_health)
    app.router.add_get("/api/orchestrators/{orchestrator_id}/stats", ledger.orchestrator_stats)
    app.router.add_post("/api/workloads/time", workloads.create_time_workload)
    app.router.add_post("/api/workloads", workloads.create_workload)
    app.router.add_get("/api/workloads", workloads.list_workloads)
    app.router.add_get("/api/workloads/summary", workloads.workload_summary)
    app.router.add_patch("/api/workloads/{workload_id}", workloads.update_workload)
    app.router.add_post("/api/ledger/adjustments", ledger.create_adjustment)
    app.router.add_get("/api/ledger/events", ledger.list_events)
    app.router.add_post("/api/sessions/events", sessions.post_session_event)
    app.router.add_get("/api/sessions", sessions.list_sessions)
    app.router.add_post("/api/activity/leases", sessions.create_lease)
    app.router.add_get("/api/activity/leases", sessions.list_leases)
    app.router.add_post("/api/activity/leases/{lease_id}/heartbeat", sessions.heartbeat_lease)
    app.router.add_delete("/api/activity/leases/{lease_id}", sessions.revoke_lease)
    tokens = "/api/licenses/orchestrators/{orchestrator_id}/tokens"
    app.router.add_post(tokens, licenses.mint_token)
    app.router.add_get(tokens, licenses.list_tokens)
    app.router.add_delete(tokens + "/{token_id}", licenses.revoke_token)
    app.router.add_put("/api/licenses/images", licenses.put_image)
    app.router.add_get("/api/licenses/images", licenses.list_images)
    app.router.add_post("/api/licenses/images/revoke", licenses.revoke_image)
    app.router.add_get("/api/licenses/access", licenses.list_access)
    app.router.add_post("/api/licenses/access/grant", licenses.grant_access)
    app.router.add_post("/api/licenses/access/revoke", licenses.revoke_access)
    app.router.add_post("/api/licenses/invites", licenses.create_invite)
    app.router.add_get("/api/licenses/invites", licenses.list_invites)
    app.router.add_post("/api/licenses/invites/revoke", licenses.revoke_invite)
    app.router.add_post("/api/licenses/invites/redeem", licenses.redeem_invite)
    app.router.add_post("/api/licenses/lease", licenses.take_lease)
    app.router.add_post("/api/licenses/lease/{lease_id}/heartbeat", licenses.heartbeat_lease)
    app.router.add_get("/api/licenses/leases", licenses.list_leases)
    app.router.add_post("/api/jobs/record", jobs.record_job)
    app.router.add_get("/api/jobs/{job_id}", jobs.get_job)
    app.router.add_post("/api/jobs/{job_id}/cancel", jobs.cancel_job)
    app.router.add_get("/api/recordings/presign", jobs.presign_recording)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware], client_max_size=settings.api_max_body_bytes
    )
    setup_routes(app)
    app[system.DOCUMENTS] = {}

    async def resources(app: web.Application) -> AsyncIterator[None]:
        engine = make_engine(settings.resolved_database_url, writer=False)
        lookups = KeyLookups(engine)
        events = EventStore(settings)
        await events.start()
        # Presigning is local (no request reaches S3): the api signs recording URLs itself,
        # with a client made on the first request that needs one.
        presigner = Presigner(
            settings.recordings_region, settings.s3_endpoint_url, settings.s3_addressing_style
        )
        app[CONTEXT] = ApiContext(
            settings=settings,
            auth=Auth(settings),
            events=events,
            engine=engine,
            sessions=make_sessionmaker(engine),
            registration_limits=RateLimiter(
                [
                    SlidingWindow(settings.registration_per_minute, REGISTRATION_WINDOW_S),
                    SlidingWindow(settings.registration_burst, REGISTRATION_BURST_WINDOW_S),
                ]
            ),
            redeem_limits=RateLimiter(
                [SlidingWindow(settings.license_redeem_per_minute, REDEEM_WINDOW_S)]
            ),
            presigner=presigner,
            lookups=lookups,
        )
        freeze_startup_objects()
        yield
        await presigner.close()
        await events.stop()
        await lookups.close()
        await engine.dispose()

    app.cleanup_ctx.append(resources)
    return app


def main() -> None:
    settings = load_settings()
    configure_logging("api", settings.log_level)
    web.run_app(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        access_log=None,
        print=None,
        shutdown_timeout=10.0,
        reuse_port=settings.api_reuse_port,
    )


if __name__ == "__main__":
    main()
