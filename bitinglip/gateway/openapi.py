"""The OpenAPI 3.1 document served at ``/openapi.json``.

Request bodies are the JSON schemas of the same pydantic models the routes
validate bodies with (:mod:`~bitinglip.gateway.schemas`,
:mod:`~bitinglip.gateway.openai.bodies`); the paths, parameters and responses are
written here, and ``tests/gateway/test_openapi_units.py`` holds them to
the app's route table and to what each handler returns.
"""

from __future__ import annotations

from typing import Any

from bitinglip import __version__
from bitinglip.gateway.openai.bodies import (
    BatchRequest,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponseRequest,
)
from bitinglip.gateway.schemas import InferRequest, JobRequest, ModelRegistration, schema
from bitinglip.platform.jobs import STATES, JobState

#: the request bodies, each under its model's name
BODIES = (JobRequest, InferRequest, ModelRegistration, BatchRequest, EmbeddingRequest, ChatCompletionRequest,
          CompletionRequest, ResponseRequest)
_ERR = {"$ref": "#/components/responses/Error"}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_PAGE = [{"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
         {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}]
_FILE_ID = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
_CURSOR = [{"name": "after", "in": "query", "schema": {"type": "string"}},
           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}]
_PARTIAL = {"X-BitingLip-Partial": {"description": "true when the job was cancelled: only its committed rows",
                                    "schema": {"type": "string", "enum": ["true", "false"]}}}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _ERR for c in codes}


def _op(summary: str, responses: dict[str, Any], *, params: list[Any] | None = None,
        body: dict[str, Any] | None = None, public: bool = False, codes: tuple[int, ...] = (401, 403, 429)
        ) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, **_errors(*codes)}}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    return op


def document() -> dict[str, Any]:
    job_list = {"type": "object", "properties": {"jobs": {"type": "array", "items": _ref("Job")},
                                                  "offset": {"type": "integer"}, "limit": {"type": "integer"},
                                                  "total": {"type": "integer"},
                                                  "next_offset": {"type": ["integer", "null"]}}}
    health = {"type": "object", "properties": {"status": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "BitingLip gateway", "version": __version__,
                 "description": "Batch inference on Dask. Every route but /health* needs a bearer JWT."},
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": _op("Health of every component (503 when one is down)",
                                   {"200": _json(health), "503": _json(health, "a component is down")},
                                   public=True, codes=())},
            "/health/live": {"get": _op("Liveness", {"200": _json(health)}, public=True, codes=())},
            "/health/ready": {"get": _op("Readiness (Redis and the cluster)",
                                         {"200": _json(health), "503": _json(health, "not ready")},
                                         public=True, codes=())},
            "/v1/models": {"get": _op(
                "Models you can name: OpenAI's list shape, or BitingLip's own listing with format=bitinglip",
                {"200": _json({"type": "object"})}, codes=(401, 403, 422, 429),
                params=[{"name": "format", "in": "query", "schema": {"type": "string",
                                                                     "enum": ["openai", "bitinglip"]}}])},
            "/v1/files": {
                "post": _op("Upload a batch file (multipart/form-data: file, purpose=batch, optional "
                            "expires_after[anchor]=created_at and expires_after[seconds]=3600..2592000, default 30 "
                            "days); it streams to the results directory and counts against your "
                            "BITINGLIP_FILES_MAX_BYTES_PER_TENANT (413 quota_exceeded)",
                            {"200": _json(_ref("File"))}, codes=(400, 401, 403, 413, 429)),
                "get": _op("Your files (OpenAI's list shape)", {"200": _json({"type": "object"})},
                           params=_CURSOR, codes=(400, 401, 403, 429)),
            },
            "/v1/files/{file_id}": {
                "get": _op("One file", {"200": _json(_ref("File"))}, params=[_FILE_ID], codes=(401, 403, 404, 429)),
                "delete": _op("Delete a file", {"200": _json({"type": "object"})}, params=[_FILE_ID],
                              codes=(401, 403, 404, 429)),
            },
            "/v1/files/{file_id}/content": {"get": _op(
                "A file's bytes (JSONL)", {"200": {"description": "JSONL", "content": {"application/jsonl": {}}}},
                params=[_FILE_ID], codes=(401, 403, 404, 429))},
            "/v1/batches": {
                "post": _op("Run a batch file as a job (OpenAI's Batch object)", {"200": _json(_ref("Batch"))},
                            body=_ref("BatchRequest"), codes=(400, 401, 403, 404, 413, 429, 503)),
                "get": _op("Your batches, newest first", {"200": _json({"type": "object"})},
                           params=_CURSOR, codes=(400, 401, 403, 429)),
            },
            "/v1/batches/{batch_id}": {"get": _op(
                "A batch's status and counts (its output and error files once it has ended)",
                {"200": _json(_ref("Batch"))}, params=[_BATCH_ID], codes=(401, 403, 404, 429))},
            "/v1/batches/{batch_id}/cancel": {"post": _op(
                "Cancel a batch; what finished stays in its output file", {"200": _json(_ref("Batch"))},
                params=[_BATCH_ID], codes=(401, 403, 404, 409, 429))},
            "/v1/embeddings": {"post": _op(
                "OpenAI's embeddings (float or base64, dimensions), batched with concurrent requests",
                {"200": _json({"type": "object"})}, body=_ref("EmbeddingRequest"),
                codes=(400, 401, 403, 413, 429, 502, 503))},
            "/v1/chat/completions": {"post": _op(
                "OpenAI's chat completion (stream: true sends chat.completion.chunk events, then [DONE])",
                {"200": {"description": "a chat.completion, or its chunks as server-sent events",
                         "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}}}},
                body=_ref("ChatCompletionRequest"), codes=(400, 401, 403, 413, 429, 502, 503))},
            "/v1/completions": {"post": _op(
                "OpenAI's text completion (stream: true sends text_completion events, then [DONE])",
                {"200": {"description": "a text_completion, or its chunks as server-sent events",
                         "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}}}},
                body=_ref("CompletionRequest"), codes=(400, 401, 403, 413, 429, 502, 503))},
            "/v1/responses": {"post": _op(
                "OpenAI's Responses API on the chat path (text output, text.format json_schema; not streamed, "
                "not stored)", {"200": _json({"type": "object"})}, body=_ref("ResponseRequest"),
                codes=(400, 401, 403, 413, 429, 502, 503))},
            "/v1/models/{name}": {"get": _op(
                "One model", {"200": _json(_ref("Model"))}, codes=(401, 403, 404, 429),
                params=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}])},
            "/v1/jobs": {
                "post": _op("Submit a job", {"202": _json(_ref("Job"), "accepted")}, body=_ref("JobRequest"),
                            params=[{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}],
                            codes=(401, 403, 413, 422, 429, 503)),
                "get": _op("Your jobs, newest first", {"200": _json(job_list)}, params=_PAGE,
                           codes=(401, 403, 422, 429)),
            },
            "/v1/jobs/{job_id}": {
                "get": _op("A job's status and progress", {"200": _json(_ref("Job"))}, params=[_JOB_ID],
                           codes=(401, 403, 404, 429)),
                "delete": _op("Cancel a job", {"202": _json(_ref("Job"), "cancelled")}, params=[_JOB_ID],
                              codes=(401, 403, 404, 409, 429)),
            },
            "/v1/jobs/{job_id}/resume": {"post": _op(
                "Resume a cancelled or failed job: same id, same output; only the partitions not committed run "
                "(an OpenAI batch's job resumes its batch)",
                {"202": _json(_ref("Job"), "queued again")}, params=[_JOB_ID],
                codes=(401, 403, 404, 409, 429, 503))},
            "/v1/jobs/{job_id}/results": {"get": _op(
                "Result rows, paged; a cancelled job's committed rows, marked partial "
                "(X-BitingLip-Partial: true, \"partial\": true)",
                {"200": {**_json(_ref("ResultPage")), "headers": _PARTIAL}},
                params=[_JOB_ID, {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                codes=(401, 403, 404, 409, 422, 429, 503))},
            "/v1/jobs/{job_id}/results/files": {"get": _op(
                "The Parquet files (of a cancelled job: those committed, marked partial)",
                {"200": {**_json({"type": "object"}), "headers": _PARTIAL}}, params=[_JOB_ID],
                codes=(401, 403, 404, 409, 429, 503))},
            "/v1/jobs/{job_id}/results/files/{name}": {"get": _op(
                "One Parquet file", {"200": {"description": "Parquet",
                                             "content": {"application/vnd.apache.parquet": {}}}},
                params=[_JOB_ID, {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                codes=(401, 403, 404, 409, 429, 503))},
            "/v1/jobs/{job_id}/events": {"get": _op(
                "Server-sent progress events until the job ends",
                {"200": {"description": "event stream", "content": {"text/event-stream": {}}}},
                params=[_JOB_ID], codes=(401, 403, 404, 429))},
            "/v1/infer": {"post": _op("Small synchronous inference, answered inline",
                                      {"200": _json({"type": "object"})}, body=_ref("InferRequest"),
                                      codes=(401, 403, 413, 422, 429, 502, 503))},
            "/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"})}, codes=(401, 429))},
            "/metrics": {"get": _op("Prometheus metrics",
                                    {"200": {"description": "Prometheus text", "content": {"text/plain": {}}}},
                                    codes=(401, 429))},
            "/admin/models": {
                "get": _op("Every model, with paths", {"200": _json({"type": "object"})}),
                "post": _op("Register a model directory under a name",
                            {"201": _json(_ref("Model"), "registered")},
                            body=_ref("ModelRegistration"), codes=(401, 403, 413, 422, 429, 503)),
            },
            "/admin/models/{name}": {"delete": _op(
                "Remove a registered model", {"204": {"description": "removed"}},
                params=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                codes=(401, 403, 404, 429))},
            "/admin/jobs": {"get": _op(
                "Every user's jobs", {"200": _json(job_list)},
                params=[*_PAGE, {"name": "owner", "in": "query", "schema": {"type": "string"}}],
                codes=(401, 403, 422, 429))},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "responses": {"Error": _json(_ref("Error"), "an error")},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "param", "code", "request_id"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                   "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                                   "request_id": {"type": "string"}}}}},
                "File": {"type": "object", "required": ["id", "object", "bytes", "created_at", "filename", "purpose"],
                         "properties": {"id": {"type": "string"}, "object": {"const": "file"},
                                        "bytes": {"type": "integer"}, "created_at": {"type": "integer"},
                                        "filename": {"type": "string"}, "purpose": {"type": "string"},
                                        "expires_at": {"type": ["integer", "null"]}}},
                "Batch": {"type": "object", "required": ["id", "object", "endpoint", "status", "request_counts"],
                          "properties": {"id": {"type": "string"}, "object": {"const": "batch"},
                                         "endpoint": {"type": "string"},
                                         "status": {"type": "string", "enum": [
                                             "validating", "in_progress", "finalizing", "completed", "failed",
                                             "cancelling", "cancelled", "expired"]},
                                         "request_counts": {"type": "object"}}},
                **{body.__name__: schema(body) for body in BODIES},
                "Model": {"type": "object", "properties": {"name": {"type": "string"},
                                                           "source": {"type": "string"}}},
                "ResultPage": {"type": "object", "properties": {
                    "job_id": {"type": "string"},
                    "state": {"type": "string", "enum": [JobState.SUCCEEDED.value, JobState.CANCELLED.value]},
                    "partial": {"type": "boolean"}, "rows": {"type": "array", "items": {"type": "object"}},
                    "offset": {"type": "integer"}, "limit": {"type": "integer"}, "total": {"type": "integer"},
                    "next_offset": {"type": ["integer", "null"]}}},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "string"},
                    "state": {"type": "string", "enum": list(STATES)},
                    "task": {"type": ["string", "null"]}, "model": {"type": ["string", "null"]},
                    "priority": {"type": ["integer", "null"]}, "rows_done": {"type": "integer"},
                    "rows_reused": {"type": "integer", "description": "rows taken from the result store, not run"},
                    "rows_total": {"type": ["integer", "null"]}, "rows_per_s": {"type": "number"},
                    "eta_s": {"type": ["number", "null"]}, "error": {"type": ["string", "null"]}}},
            },
        },
    }
