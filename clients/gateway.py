"""HTTP gateway to the online-inference, async-jobs and RAG dataflows, for clients that speak HTTP.

    POST /v1/models/{name}:predict   {"inputs": ..., "timeout_ms": 1000}  -> the reply
    POST /v1/models/rag:predict      {"inputs": {"query": ..., "k": 5}}  -> a RAG answer (dataflows.rag)
    POST /v1/jobs                    {"model": ..., "inputs": [...], "job_id": optional}  -> 202 {"job_id", "status"}
    GET  /v1/jobs/{job_id}           -> the job's record (pending, running, done with outputs, failed with error)
    GET  /healthz                    200 when the broker answers, else 503 (no key needed)

With API keys configured (:mod:`clients.api_keys`: ``GATEWAY_API_KEYS_FILE`` or
``GATEWAY_API_KEYS``), every other route needs one: 401 without a known key, 403 for a
model the key may not use. With ``GATEWAY_TLS_CERT_FILE`` and ``GATEWAY_TLS_KEY_FILE`` (and
``GATEWAY_TLS_KEY_PASSWORD`` for an encrypted key) it serves HTTPS only; a certificate and key
that cannot serve stop it at start, naming the settings. Without them it speaks plain HTTP,
for a TLS-terminating proxy in front (docs/online.md).

Each predict request becomes a Kafka request/reply through one shared
:class:`~clients.inference.AsyncInferenceClient`. Status codes: 200 ok, 400 bad
input (bad JSON body, schema violation, unknown model), 429 rejected (the
dataflow shed load), 504 timeout (the deadline passed, in the dataflow or here).
Jobs go through one :class:`~clients.jobs.JobsClient` and RAG queries through
a second inference client, each started in the background: until their
dataflow's topics exist, their routes answer 503 and say what to start.
``GET`` answers 404 for an id never submitted. A RAG query waits up to
``GATEWAY_RAG_TIMEOUT_MS`` unless its body says otherwise: generating an answer
on a CPU takes a good part of a second.

Run: ``python -m clients.gateway`` (settings: ``GATEWAY_HOST``, ``GATEWAY_PORT``,
``GATEWAY_TIMEOUT_MS``, ``GATEWAY_RAG_TIMEOUT_MS``, ``GATEWAY_API_KEYS_FILE``,
``GATEWAY_API_KEYS``, ``GATEWAY_TLS_CERT_FILE``, ``GATEWAY_TLS_KEY_FILE``,
``GATEWAY_TLS_KEY_PASSWORD``, ``KAFKA_BOOTSTRAP_SERVERS`` and the client-security variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import uvicorn
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clients.api_keys import ApiKeys, Denied
from clients.inference import AsyncInferenceClient, InferenceTimeout
from clients.jobs import JobsClient, JobSubmitError
from operators.kafka import KafkaError, admin_config
from operators.protocol import (
    JOBS_RESULTS_TOPIC,
    JOBS_SUBMIT_TOPIC,
    RAG_ANSWERS_TOPIC,
    RAG_MODEL,
    RAG_QUERIES_TOPIC,
    REPLY_TOPIC,
    REQUEST_TOPIC,
)
from operators.settings import brokers_field, from_env
from patternflow.secrets import secret_field

__all__ = ["Settings", "create_app", "server_options"]

log = logging.getLogger(__name__)
T = TypeVar("T")

NO_JOB_WORKERS = {
    "status": "unavailable",
    "error": "the async-jobs topics do not exist yet: start dataflows.async_jobs",
}
NO_RAG = {"status": "unavailable", "error": "the RAG topics do not exist yet: start dataflows.rag"}
STATUS_CODES = {"ok": 200, "error": 400, "rejected": 429, "timeout": 504}


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str = brokers_field()
    host: str = "127.0.0.1"
    port: int = 8080
    timeout_ms: int = 1_000
    rag_timeout_ms: int = 10_000
    request_topic: str = REQUEST_TOPIC
    reply_topic: str = REPLY_TOPIC
    jobs_submit_topic: str = JOBS_SUBMIT_TOPIC
    jobs_results_topic: str = JOBS_RESULTS_TOPIC
    rag_queries_topic: str = RAG_QUERIES_TOPIC
    rag_answers_topic: str = RAG_ANSWERS_TOPIC
    api_keys_file: str = ""  # API keys, a line each: name key models (clients.api_keys)
    api_keys: str = secret_field()  # the same lines, ";" between them
    tls_cert_file: str = ""  # HTTPS: the server's certificate (PEM, any intermediates after it) ...
    tls_key_file: str = ""  # ... and its private key (PEM); neither: plain HTTP
    tls_key_password: str = secret_field()  # the key's password, when it is encrypted

    def keys(self) -> ApiKeys:
        """The configured API keys (none: the gateway is open); ``ValueError`` naming a bad line."""
        lines = self.api_keys.split(";") if self.api_keys else []
        keys = ApiKeys.parse(lines, "GATEWAY_API_KEYS").keys
        if self.api_keys_file:
            with open(self.api_keys_file) as file:
                keys += ApiKeys.parse(file, f"GATEWAY_API_KEYS_FILE ({self.api_keys_file})").keys
        return ApiKeys(keys)

    def tls(self) -> bool:
        """Whether the gateway serves HTTPS; ``ValueError`` naming the settings when its certificate
        and key cannot serve (one without the other, a file missing, a key that does not match or
        does not open), never quoting a file's contents."""
        if not self.tls_cert_file and not self.tls_key_file:
            return False
        if not self.tls_cert_file or not self.tls_key_file:
            missing = "GATEWAY_TLS_KEY_FILE" if self.tls_cert_file else "GATEWAY_TLS_CERT_FILE"
            raise ValueError(f"GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE go together: {missing} is not set")
        named = f"GATEWAY_TLS_CERT_FILE ({self.tls_cert_file}) and GATEWAY_TLS_KEY_FILE ({self.tls_key_file})"
        try:
            # The password given even when empty: an encrypted key without one fails here, where
            # OpenSSL would otherwise ask for it on the terminal.
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file, self.tls_key_password)
        except ssl.SSLError as exc:
            raise ValueError(
                f"{named} cannot serve TLS ({exc.reason or exc.__class__.__name__}): is the key the certificate's, "
                "and GATEWAY_TLS_KEY_PASSWORD its password?"
            ) from exc
        except OSError as exc:
            raise ValueError(f"{named}: {exc.strerror or exc}") from exc
        return True


def _refused(denied: Denied) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if denied.status == 401 else None
    return JSONResponse({"status": "unauthorized", "error": denied.error}, status_code=denied.status, headers=headers)


def create_app(settings: Settings) -> Starlette:
    clients: list[AsyncInferenceClient] = []
    jobs: list[JobsClient] = []
    admin = AdminClient(admin_config(settings.kafka_bootstrap_servers))
    keys = settings.keys()
    if keys.keys:
        log.info("the gateway asks for API keys: %s", ", ".join(k.name for k in keys.keys))
    else:
        log.warning("no API keys configured (GATEWAY_API_KEYS_FILE): the gateway answers anyone")

    rag: list[AsyncInferenceClient] = []

    async def start_when_topics_exist(wanted: set[str], start: Callable[[], T], into: list[T]) -> None:
        # Polls here, quietly and cancellably, rather than in the client: the gateway may serve
        # predictions for days without the other dataflows.
        while True:
            try:
                if wanted <= set((await asyncio.to_thread(admin.list_topics, timeout=5)).topics):
                    into.append(await asyncio.to_thread(start))
                    return
            except (KafkaException, KafkaError) as exc:  # the broker is down or restarting: try again
                log.warning("routes wait for the broker: %s", exc)
            await asyncio.sleep(2)

    def jobs_client() -> JobsClient:
        return JobsClient(
            settings.kafka_bootstrap_servers,
            submit_topic=settings.jobs_submit_topic,
            results_topic=settings.jobs_results_topic,
        )

    def rag_client() -> AsyncInferenceClient:
        return AsyncInferenceClient(
            settings.kafka_bootstrap_servers,
            request_topic=settings.rag_queries_topic,
            reply_topic=settings.rag_answers_topic,
            timeout_s=settings.rag_timeout_ms / 1000,
        )

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
        starting = [
            asyncio.create_task(start_when_topics_exist(
                {settings.jobs_submit_topic, settings.jobs_results_topic}, jobs_client, jobs
            )),
            asyncio.create_task(start_when_topics_exist(
                {settings.rag_queries_topic, settings.rag_answers_topic}, rag_client, rag
            )),
        ]  # fmt: skip
        yield
        for task in starting:
            task.cancel()
        for inference_client in (client, *rag):
            await inference_client.close()
        for started in jobs:
            await asyncio.to_thread(started.close)

    async def predict(request: Request) -> Response:
        name = request.path_params["name"]
        if denied := keys.check(request.headers, name):
            return _refused(denied)
        try:
            body = orjson.loads(await request.body())
            if not isinstance(body, dict) or "inputs" not in body:
                raise ValueError('expected a JSON object {"inputs": ..., "timeout_ms": optional}')
            timeout_ms = body.get("timeout_ms", settings.rag_timeout_ms if name == RAG_MODEL else settings.timeout_ms)
            if not isinstance(timeout_ms, int) or timeout_ms <= 0:
                raise ValueError(f"timeout_ms must be a positive integer, got {timeout_ms!r}")
        except ValueError as exc:
            return JSONResponse({"status": "error", "error": str(exc)}, status_code=400)
        if name == RAG_MODEL and not rag:
            return JSONResponse(NO_RAG, status_code=503)
        try:
            serving = rag[0] if name == RAG_MODEL else clients[0]
            reply = await serving.predict(name, body["inputs"], timeout_s=timeout_ms / 1000)
        except InferenceTimeout as exc:
            return JSONResponse({"status": "timeout", "error": str(exc)}, status_code=504)
        return JSONResponse(reply, status_code=STATUS_CODES.get(reply.get("status", ""), 502))

    async def submit_job(request: Request) -> Response:
        if denied := keys.check(request.headers, None):
            return _refused(denied)
        if not jobs:
            return JSONResponse(NO_JOB_WORKERS, status_code=503)
        try:
            body = orjson.loads(await request.body())
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                raise ValueError('expected a JSON object {"model": "<name>", "inputs": [...], "job_id": optional}')
            if not isinstance(body.get("inputs"), list) or not isinstance(body.get("job_id", ""), str):
                raise ValueError('"inputs" must be a list of instances and "job_id", if given, a string')
        except ValueError as exc:
            return JSONResponse({"status": "error", "error": str(exc)}, status_code=400)
        if denied := keys.check(request.headers, body["model"]):
            return _refused(denied)
        try:
            job_id = await asyncio.to_thread(jobs[0].submit, body["model"], body["inputs"], job_id=body.get("job_id"))
        except ValueError as exc:
            return JSONResponse({"status": "error", "error": str(exc)}, status_code=400)
        except JobSubmitError as exc:
            return JSONResponse({"status": "error", "error": str(exc)}, status_code=502)
        return JSONResponse(jobs[0].status(job_id), status_code=202)

    async def get_job(request: Request) -> Response:
        if denied := keys.check(request.headers, None):
            return _refused(denied)
        if not jobs:
            return JSONResponse(NO_JOB_WORKERS, status_code=503)
        record = jobs[0].status(request.path_params["job_id"])
        return JSONResponse(record, status_code=404 if record["status"] == "unknown" else 200)

    async def healthz(request: Request) -> Response:
        try:
            topics = (await asyncio.to_thread(admin.list_topics, timeout=2)).topics
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        ready = settings.request_topic in topics and settings.reply_topic in topics
        return JSONResponse({"status": "ok" if ready else "no topics"}, status_code=200 if ready else 503)

    routes = [
        Route("/v1/models/{name}:predict", predict, methods=["POST"]),
        Route("/v1/jobs", submit_job, methods=["POST"]),
        Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def server_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn serves the gateway: its address, and its certificate and key when it serves HTTPS."""
    options: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": "warning"}
    tls = settings.tls()
    if tls:
        options |= {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
        options["ssl_keyfile_password"] = settings.tls_key_password or None
    log.info("the gateway serves %s://%s:%d", "https" if tls else "http", settings.host, settings.port)
    return options


def main() -> None:
    settings = from_env(Settings, prefix="GATEWAY_")
    uvicorn.run(create_app(settings), **server_options(settings))


if __name__ == "__main__":
    main()
