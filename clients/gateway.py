"""HTTP gateway to the online-inference dataflow, for clients that speak HTTP.

    POST /v1/models/{name}:predict   {"inputs": ..., "timeout_ms": 1000}  -> the reply
    GET  /healthz                    200 when the broker answers, else 503

Each HTTP request becomes a Kafka request/reply through one shared
:class:`~clients.inference.AsyncInferenceClient`. Status codes: 200 ok, 400 bad
input (bad JSON body, schema violation, unknown model), 429 rejected (the
dataflow shed load), 504 timeout (the deadline passed, in the dataflow or here).

Run: ``python -m clients.gateway`` (settings: ``GATEWAY_HOST``, ``GATEWAY_PORT``,
``GATEWAY_TIMEOUT_MS``, ``KAFKA_BOOTSTRAP_SERVERS``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import uvicorn
from confluent_kafka.admin import AdminClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clients.inference import AsyncInferenceClient, InferenceTimeout
from operators.protocol import REPLY_TOPIC, REQUEST_TOPIC
from operators.settings import brokers_field, from_env

__all__ = ["Settings", "create_app"]

STATUS_CODES = {"ok": 200, "error": 400, "rejected": 429, "timeout": 504}


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str = brokers_field()
    host: str = "127.0.0.1"
    port: int = 8080
    timeout_ms: int = 1_000
    request_topic: str = REQUEST_TOPIC
    reply_topic: str = REPLY_TOPIC


def create_app(settings: Settings) -> Starlette:
    clients: list[AsyncInferenceClient] = []
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = await asyncio.to_thread(
            AsyncInferenceClient,
            settings.kafka_bootstrap_servers,
            request_topic=settings.request_topic,
            reply_topic=settings.reply_topic,
            timeout_s=settings.timeout_ms / 1000,
        )
        clients.append(client)
        yield
        await client.close()

    async def predict(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            body = orjson.loads(await request.body())
            if not isinstance(body, dict) or "inputs" not in body:
                raise ValueError('expected a JSON object {"inputs": ..., "timeout_ms": optional}')
            timeout_ms = body.get("timeout_ms", settings.timeout_ms)
            if not isinstance(timeout_ms, int) or timeout_ms <= 0:
                raise ValueError(f"timeout_ms must be a positive integer, got {timeout_ms!r}")
        except ValueError as exc:
            return JSONResponse({"status": "error", "error": str(exc)}, status_code=400)
        try:
            reply = await clients[0].predict(name, body["inputs"], timeout_s=timeout_ms / 1000)
        except InferenceTimeout as exc:
            return JSONResponse({"status": "timeout", "error": str(exc)}, status_code=504)
        return JSONResponse(reply, status_code=STATUS_CODES.get(reply.get("status", ""), 502))

    async def healthz(request: Request) -> Response:
        try:
            topics = (await asyncio.to_thread(admin.list_topics, timeout=2)).topics
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        ready = settings.request_topic in topics and settings.reply_topic in topics
        return JSONResponse({"status": "ok" if ready else "no topics"}, status_code=200 if ready else 503)

    routes = [
        Route("/v1/models/{name}:predict", predict, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    settings = from_env(Settings, prefix="GATEWAY_")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main()
