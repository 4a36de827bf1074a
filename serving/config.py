"""One configuration model for the whole platform.

The same model drives `serving up`, the Ray Serve application and the Helm chart's serveConfigV2.
It is loaded from a YAML file; `SERVING_*` environment variables override the file
(nested fields with `__`, e.g. `SERVING_GATEWAY__PORT=9000`, lists and dicts as JSON).

vLLM names (engine arguments, OpenAI-server options) are checked against vLLM itself only when
the caller asks for it (`load_config(..., check_vllm=True)`): the gateway must be able to read a
configuration without importing vllm or torch.
"""

from __future__ import annotations

import contextvars
import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"

# engine arguments that the platform sets itself from other fields
_RESERVED_ENGINE_ARGS = {
    "model": "source",
    "served_model_name": "name",
    "tokenizer_revision": "revision",
    "revision": "revision",
    "enable_lora": "lora_adapters or runtime_adapters",
    "lora_modules": "lora_adapters",
    "scheduling_policy": "batches",
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names each bad path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Autoscaling(_Strict):
    """Ray Serve autoscaling for one model's replicas."""

    min_replicas: int = Field(
        1, ge=0, description="Fewest replicas; 0 lets a model scale to zero: a request then waits for a "
        "replica to start (within gateway.request_timeout_s), and /ready counts the model as ready.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        ...,
        gt=0,
        description="Ongoing requests per replica that autoscaling aims for. Explicit on purpose: "
        "a huge default (Ray Serve LLM uses 1e9) never scales.",
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Seconds of high load before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Seconds of low load before removing replicas.")

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class Resources(_Strict):
    """What one replica of a model reserves in the Ray cluster."""

    gpus: float = Field(0, ge=0, description="GPUs per replica (tensor parallel size for whole GPUs).")
    cpus: float = Field(1, ge=0, description="Logical CPUs per replica.")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the replica must run on, e.g. H100 or A10G."
    )
    memory_gib: float | None = Field(None, gt=0, description="Host memory reserved per replica, GiB.")


class ModelConfig(_Strict):
    """One served model: a vLLM engine in a Ray Serve deployment of its own."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Name clients send as `model`.")
    source: str = Field(..., min_length=1, description="Local directory or hub id of the weights.")
    kind: Literal["generate", "embed"] = Field(
        "generate", description="`generate`: chat and text completions; `embed`: embeddings."
    )
    revision: str | None = Field(None, description="Hub revision of the weights; also scopes cached answers.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any vLLM engine argument (AsyncEngineArgs field names, e.g. max_model_len, "
        "dtype, quantization, gpu_memory_utilization).",
    )
    server_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any vLLM OpenAI-server option (`vllm serve` flag names with underscores, e.g. "
        "tool_call_parser, enable_auto_tool_choice, chat_template, reasoning_parser).",
    )
    lora_adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served as model names of their own: name -> directory.",
    )
    replicas: int = Field(1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: Autoscaling | None = Field(None, description="Autoscaling instead of a fixed count.")
    resources: Resources = Field(default_factory=Resources, description="Per-replica resources.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one replica takes at once; beyond it Ray Serve queues."
    )
    max_queued_requests: int = Field(
        512, ge=1,
        description="Requests each gateway replica queues for this model beyond what its replicas take; "
        "beyond that, 503 with Retry-After at once instead of waiting without bound.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the model's replicas."
    )
    cache: Literal["off", "reproducible", "all"] | None = Field(
        None, description="Response cache for this model; default: cache.mode."
    )
    runtime_adapters: bool = Field(
        False,
        description="Takes LoRA adapters loaded at runtime (POST /v1/load_lora_adapter, `serving adapters add`) "
        "with this model as their base: its engine runs with LoRA enabled (size them with engine_args max_loras, "
        "max_cpu_loras, max_lora_rank). A model with lora_adapters takes them too.",
    )
    routing: Literal["affinity", "load"] = Field(
        "affinity",
        description="How the gateways pick this model's replica for a request. affinity: the replica that "
        "holds the request's prompt prefix in its prefix cache (every turn of a conversation goes to the same "
        "replica, from any gateway) and, for a LoRA adapter, one that has it loaded; passed over when its queue "
        "is too much longer than the shortest (routing_max_imbalance). load: Ray Serve's power of two "
        "choices on queue lengths alone.",
    )
    routing_max_imbalance: int = Field(
        4, ge=0,
        description="affinity routing: requests by which the preferred replica's queue may exceed the shortest "
        "queue (or a quarter of the shortest queue, when that is more) before its requests go to the next replica "
        "in their ranking.",
    )
    batches: bool = Field(
        True,
        description="Takes the lines of batches (the Batch API, /v1/batches). Its engine then schedules by vLLM's "
        "request priority (`--scheduling-policy priority`): interactive requests run at priority 0, batch lines at "
        "batches.priority, so waiting interactive requests are started first. false: fcfs, and batch lines for "
        "this model fail with 400 model_not_batchable.",
    )

    @model_validator(mode="after")
    def _no_reserved_args(self) -> "ModelConfig":
        for arg, field in _RESERVED_ENGINE_ARGS.items():
            if arg in self.engine_args:
                raise ValueError(f"engine_args.{arg} is set by the platform: use `{field}` instead")
        for adapter in self.lora_adapters:
            if not re.match(NAME_PATTERN, adapter):
                raise ValueError(f"lora_adapters: {adapter!r} is not a valid model name")
        if (self.lora_adapters or self.runtime_adapters) and self.kind != "generate":
            raise ValueError("lora_adapters and runtime_adapters need kind: generate")
        return self

    @property
    def served_names(self) -> list[str]:
        """The model names this deployment answers: its own and its adapters'."""
        return [self.name, *self.lora_adapters]

    # a model's Ray Serve application and its one deployment share this name (serving.app)
    APP_PREFIX: ClassVar[str] = "model-"

    @property
    def deployment_name(self) -> str:
        return self.APP_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)

    @property
    def app_name(self) -> str:
        """The model's own Ray Serve application (the same name as its deployment)."""
        return self.deployment_name

    @property
    def scales_to_zero(self) -> bool:
        """Its autoscaling may leave it no replica (a request then starts one)."""
        return self.autoscaling is not None and self.autoscaling.min_replicas == 0


class GatewayConfig(_Strict):
    """The OpenAI-compatible front door (a FastAPI app as Ray Serve ingress)."""

    host: str = Field("0.0.0.0", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port; the API is under /v1.")
    replicas: int = Field(1, ge=1, description="Gateway replicas (CPU only, start in seconds).")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Longest a request may run end to end; the engine work is aborted then."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond it)."
    )
    body_timeout_s: float = Field(
        30.0, gt=0,
        description="Longest a request's body may take to arrive (408 after): a client trickling its body "
        "would otherwise hold one of the replica's max_ongoing_requests for as long as it likes.",
    )
    max_ongoing_requests: int = Field(1000, ge=1, description="Requests one gateway replica takes at once.")
    cpus: float = Field(1, ge=0, description="Logical CPUs reserved per gateway replica.")
    max_messages: int = Field(2048, ge=1, description="Most `messages` in one chat request (400 beyond).")
    max_tools: int = Field(256, ge=0, description="Most `tools` in one chat request (400 beyond).")
    reject_unknown_fields: bool = Field(
        True, description="400 for request fields neither vLLM nor OpenAI's API knows, e.g. a typo such as "
        "`temprature` (vLLM itself would ignore them). Fields only OpenAI knows are accepted and dropped."
    )
    metrics_port: int = Field(
        8080, ge=1, le=65535,
        description="Per-node Prometheus endpoint (Ray's metrics agent) that `serving up` starts Ray with.",
    )
    ray_resource: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="A custom Ray resource each gateway replica requests one unit of, so that gateways run only "
        "on nodes that advertise it (the chart: `serving_gateway`, advertised by the head pod alone, the only pod "
        "given the gateways' secrets). Unset: gateways go wherever Ray places them.",
    )
    shutdown_grace_s: float = Field(
        60.0, ge=0,
        description="Seconds a gateway replica being replaced (rollout, scale-down) may take to finish the "
        "streams it carries, after HAProxy has stopped sending it new ones; what is still open then is cut.",
    )
    direct_streams: bool = Field(
        True,
        description="Model replicas send answers to each gateway replica over one TCP connection (an "
        "ephemeral port on the model replica's node), all of that gateway's chunks of an engine step in one "
        "frame, instead of one Ray message per chunk. Routing, queueing and cancellation stay with Ray Serve.",
    )
    cors_allowed_origins: list[str] = Field(
        [],
        description="Origins (scheme://host[:port], as a browser sends them, or `*`) whose web pages may call "
        "the API from a browser (CORS), like `vllm serve --allowed-origins`. Empty: CORS is off and browsers "
        "refuse cross-origin calls. API keys are bearer tokens, not cookies, so CORS adds nothing for other "
        "clients; turn it on only for a browser app that calls the API itself (its users can read its key).",
    )
    cors_allowed_headers: list[str] = Field(
        ["authorization", "content-type", "accept", "cache-control", "user-agent", "x-request-id", "x-api-key",
         "openai-organization", "openai-project", "openai-beta", "anthropic-version", "anthropic-beta",
         "anthropic-dangerous-direct-browser-access", "idempotency-key", "x-stainless-arch", "x-stainless-lang",
         "x-stainless-os", "x-stainless-package-version", "x-stainless-runtime", "x-stainless-runtime-version",
         "x-stainless-retry-count", "x-stainless-timeout", "x-stainless-read-timeout", "x-stainless-helper",
         "x-stainless-helper-method", "x-stainless-stream-helper", "x-stainless-poll-helper",
         "x-stainless-custom-poll-interval", "x-stainless-async"],
        description="Request headers a cross-origin page may send (with cors_allowed_origins set); the default "
        "covers the OpenAI and Anthropic SDKs in a browser (their x-stainless-* headers by name: CORS has no "
        "wildcard per prefix). `*`: any header.",
    )

    @field_validator("cors_allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        # a browser's Origin is scheme://host[:port], lowercase, no path: "https://app.example.com/" would
        # never match one, so it is refused here rather than silently matching nothing
        bad = [o for o in origins if not re.fullmatch(r"\*|[a-z][a-z0-9+.-]*://[^/?#\s]+", o.lower())]
        if bad:
            raise ValueError(f"not an origin (scheme://host[:port], no path, or *): {bad[0]!r}")
        return [o.lower() for o in origins]

    @field_validator("cors_allowed_headers")
    @classmethod
    def _headers(cls, headers: list[str]) -> list[str]:
        bad = [h for h in headers if not re.fullmatch(r"\*|[A-Za-z0-9!#$%&'*+.^_`|~-]+", h)]
        if bad:
            raise ValueError(f"not a header name: {bad[0]!r}")
        return [h.lower() for h in headers]


class RedisConfig(_Strict):
    """Where the cache, API keys, rate-limit counters and usage live."""

    url: str | None = Field(
        None, description="redis:// or rediss:// (TLS) URL. Unset: an in-process store (one gateway replica, "
        "local use).",
    )
    password: SecretStr | None = Field(None, description="Password, if not in the URL (e.g. from a Secret).")
    timeout_s: float = Field(
        0.25, gt=0, le=10, description="Longest any Redis call may take before the gateway goes on without it."
    )
    retry_interval_s: float = Field(
        2.0, gt=0, description="After a Redis failure, calls are skipped for this long, then tried again."
    )
    key_prefix: str = Field("serving:", description="Prefix of every Redis key the platform writes.")
    max_connections: int = Field(
        64, ge=1, description="Connection pool size per gateway replica; also the most Redis calls one replica "
        "has in flight at once (the others wait for a connection, see pool_timeout_s).",
    )
    pool_timeout_s: float = Field(
        1.0, gt=0, le=30,
        description="Longest a call waits for a free connection when all max_connections are busy. A wait that "
        "runs out skips that call like a Redis failure would, but is no Redis fault: it never opens the "
        "breaker of retry_interval_s.",
    )
    tls_ca_file: str | None = Field(
        None, description="rediss:// only: PEM file of the CA(s) that sign the Redis server's certificate "
        "(e.g. a mounted Secret); unset: the system's CAs. The server's name is checked against its certificate.",
    )
    tls_cert_file: str | None = Field(
        None, description="rediss:// only: PEM client certificate, for a Redis that requires one "
        "(`tls-auth-clients yes`); needs tls_key_file.",
    )
    tls_key_file: str | None = Field(None, description="rediss:// only: PEM private key of tls_cert_file.")

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> "RedisConfig":
        tls = {"tls_ca_file": self.tls_ca_file, "tls_cert_file": self.tls_cert_file, "tls_key_file": self.tls_key_file}
        given = [name for name, value in tls.items() if value]
        if given and not (self.url or "").startswith("rediss://"):
            raise ValueError(f"{', '.join(given)}: only with a rediss:// url (TLS)")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


class CacheConfig(_Strict):
    """Exact-match response cache."""

    mode: Literal["off", "reproducible", "all"] = Field(
        "reproducible",
        description="off; reproducible: only requests whose output is reproducible (temperature 0 or a seed; "
        "embeddings); all: every request.",
    )
    ttl_s: int = Field(3600, ge=1, description="Seconds an answer stays cached.")
    max_entry_bytes: int = Field(1 << 20, ge=1, description="Larger answers are not cached.")
    shared: bool = Field(
        False, description="Share cached answers across API keys (off: an answer never crosses tenants)."
    )
    prefix_salt: Literal["per_key", "shared"] = Field(
        "per_key",
        description="vLLM's prefix (KV) cache: per_key salts every request with a keyed hash of its API key, so "
        "keys never share cached prefixes and none can time whether another sent a prompt; shared lets all keys "
        "share them (faster for prompts common to many keys, but a key can probe what others sent). A client's "
        "own `cache_salt` is always dropped.",
    )


class ResponsesConfig(_Strict):
    """Stored responses of the Responses API (`store`, `previous_response_id`), kept in Redis (in-process
    without Redis) by the gateway, so every gateway and model replica sees them."""

    ttl_s: int = Field(
        30 * 86400, ge=60,
        description="Seconds a stored response is kept after the last turn of its chain was stored (OpenAI keeps "
        "them 30 days). Under Redis memory pressure they are evicted before anything without a TTL.",
    )


class FilesConfig(_Strict):
    """Uploaded files (the Files API, /v1/files; purpose `batch`) and the output files of batches. Their
    records live in Redis (in-process without Redis); their bytes in `storage_url`."""

    storage_url: str = Field(
        "file:///tmp/serving-files",
        description="Where file contents are kept: a local directory (`file:///path`; in the chart a mounted PVC, "
        "shared by every gateway replica), or any fsspec URL whose filesystem is installed (`s3://bucket/prefix` "
        "with s3fs, `gs://...` with gcsfs; credentials from the environment as that library reads them). Every "
        "gateway replica must see the same storage.",
    )
    max_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, description="Largest file one upload may have (413 beyond; OpenAI's is 200 MB)."
    )
    upload_timeout_s: float = Field(
        600.0, gt=0, description="Longest an upload's body may take to arrive (408 after)."
    )
    ttl_s: int = Field(
        30 * 86400, ge=3600, le=30 * 86400,
        description="Seconds a file of purpose batch or batch_output is kept when its upload (or batch) sets no "
        "expires_after (OpenAI's default: 30 days).",
    )


class BatchesConfig(_Strict):
    """The Batch API (/v1/batches): lines run on the same model deployments as interactive traffic, through
    Ray Serve, at a lower vLLM priority, a bounded number in flight. Progress is checkpointed in Redis; a
    batch whose gateway replica dies is resumed by another."""

    max_in_flight: int = Field(
        4, ge=1,
        description="Lines of batches one gateway replica has in flight per model at once (all its batches "
        "together). Interactive requests keep their latency because batch lines never fill a replica's batch.",
    )
    priority: int = Field(
        10, ge=1, description="vLLM request priority of batch lines (interactive requests: 0; lower runs first)."
    )
    max_lines: int = Field(50_000, ge=1, description="Most requests in one batch's input file (OpenAI's: 50,000).")
    max_running: int = Field(
        4, ge=1, description="Batches one gateway replica runs at once (taken in turn from each API key's oldest)."
    )
    max_active_per_key: int = Field(
        16, ge=1, description="Batches one API key may have not finished (429 batch_limit_exceeded beyond)."
    )
    lease_s: float = Field(
        15.0, ge=2,
        description="A batch is run by the gateway replica holding its lease, renewed every third of this; a "
        "replica that dies gives it up after at most this long, and another resumes the batch.",
    )
    checkpoint_lines: int = Field(
        64, ge=1, description="Finished lines written to storage and recorded as done in one checkpoint."
    )
    checkpoint_s: float = Field(2.0, gt=0, description="Longest finished lines wait for a checkpoint.")
    poll_s: float = Field(1.0, gt=0, description="How often a gateway replica looks for batches to run.")


class APIKeySpec(_Strict):
    """An API key given in the configuration (e.g. bootstrapped from a Kubernetes Secret)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Name shown in usage and logs.")
    key: SecretStr = Field(..., description="The secret key clients send as `Authorization: Bearer <key>`.")
    models: list[str] | None = Field(None, description="Models the key may use; unset: all.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute; unset: unlimited.")
    tpm: int | None = Field(None, ge=1, description="Tokens (prompt + completion) per minute; unset: unlimited.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Requests of this key in flight at once (429 beyond); unset: limits.max_concurrent."
    )
    max_n: int | None = Field(None, ge=1, description="Largest `n` (choices per request); unset: limits.max_n.")
    max_tokens: int | None = Field(
        None, ge=1, description="Largest `max_tokens`/`max_completion_tokens`; unset: limits.max_tokens."
    )
    admin: bool = Field(
        False, description="May load and unload LoRA adapters at runtime (/v1/load_lora_adapter); other keys "
        "get 403."
    )

    @model_validator(mode="after")
    def _long_enough(self) -> "APIKeySpec":
        if len(self.key.get_secret_value()) < 16:
            raise ValueError("key: at least 16 characters")
        return self


class AuthConfig(_Strict):
    """API keys."""

    enabled: bool = Field(True, description="Require an API key on /v1 routes. Off only for local use.")
    keys: list[APIKeySpec] = Field(
        default_factory=list, description="Keys from the configuration, in addition to those in Redis."
    )


class LimitsConfig(_Strict):
    """Per-key rate limits and caps, and the limit on failed API-key attempts."""

    failure_policy: Literal["open", "closed"] = Field(
        "open", description="When Redis is unreachable: open lets requests through, closed answers 503."
    )
    max_concurrent: int | None = Field(
        64, ge=1,
        description="Requests one API key may have in flight at once, across all gateway replicas (429 beyond); "
        "a key's own max_concurrent overrides it. Unset: no cap. Not applied with auth off.",
    )
    max_n: int | None = Field(
        16, ge=1, description="Largest `n` (choices per request) of a request (400 beyond); a key's own max_n "
        "overrides it. Unset: no cap.",
    )
    max_tokens: int | None = Field(
        None, ge=1,
        description="Largest `max_tokens`/`max_completion_tokens` of a request (400 beyond); a request that sets "
        "neither is given this value. A key's own max_tokens overrides it. Unset: no cap (the model's context).",
    )
    reserve_max_tokens: int = Field(
        1024, ge=0,
        description="Completion tokens reserved against a key's TPM for a chat request that sets no max_tokens "
        "when no cap applies (with a cap, the cap is reserved); the real usage replaces the reservation after.",
    )
    failed_auth_per_source: int = Field(
        0, ge=0,
        description="Unknown, revoked or expired API keys one client address may try per window_s on one gateway "
        "replica (checks in progress count too); beyond it 429 with Retry-After, without asking Redis. Keys "
        "this replica verified before are never held back. 0 (default): no limit. Set it only where gateways "
        "see the clients' own addresses: behind Ray Serve's HAProxy (the default) every client has the proxy's "
        "address, and one budget for all would let a flood of bad keys lock out every key new to a replica.",
    )
    # last: README's reference is regenerated up to this field's row
    window_s: int = Field(60, ge=1, le=3600, description="Length of the sliding window of RPM and TPM, seconds.")


class ServingConfig(BaseSettings):
    """The whole platform."""

    model_config = SettingsConfigDict(
        env_prefix="SERVING_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    models: list[ModelConfig] = Field(default_factory=list, description="Served models.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="The gateway.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Response cache.")
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig, description="Stored responses.")
    files: FilesConfig = Field(default_factory=FilesConfig, description="Files (the Files API).")
    batches: BatchesConfig = Field(default_factory=BatchesConfig, description="Batches (the Batch API).")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Rate limits.")

    @model_validator(mode="after")
    def _unique_names(self) -> "ServingConfig":
        seen: dict[str, str] = {}
        for i, model in enumerate(self.models):
            for name in model.served_names:
                where = f"models[{i}]" + ("" if name == model.name else f".lora_adapters.{name}")
                if name in seen:
                    raise ValueError(f"model name {name!r} is used twice: {seen[name]} and {where}")
                seen[name] = where
        apps: dict[str, int] = {}
        for i, model in enumerate(self.models):
            if model.app_name in apps:
                raise ValueError(f"models[{i}] ({model.name}): its Ray Serve application and deployment name "
                                 f"{model.app_name} is also models[{apps[model.app_name]}]'s (names differ only in "
                                 "characters outside [A-Za-z0-9_-]): rename one")
            apps[model.app_name] = i
        for i, key in enumerate(self.auth.keys):
            unknown = [m for m in key.models or [] if m not in seen]
            if unknown:
                raise ValueError(f"auth.keys[{i}].models: unknown model(s) {', '.join(unknown)}")
        names = [k.name for k in self.auth.keys]
        if len(names) != len(set(names)):
            raise ValueError("auth.keys: two keys have the same name")
        return self

    def cache_mode(self, model: ModelConfig) -> str:
        return model.cache or self.cache.mode

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # explicit arguments, then SERVING_* variables, then the file: the environment overrides the file
        return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=_FILE_DATA.get({})))

    def model(self, name: str) -> ModelConfig | None:
        """The model config serving `name` (a model or one of its adapters)."""
        for model in self.models:
            if name in model.served_names:
                return model
        return None


# What the configuration file said, set only for the duration of one `load_config` call. No default:
# a default dict would be one object shared by every context; readers get a fresh {} instead.
_FILE_DATA: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("serving_file_data")


def load_config(
    path: str | Path | None = None,
    *,
    data: dict[str, Any] | None = None,
    check_vllm: bool = False,
) -> ServingConfig:
    """Load and validate a configuration: a YAML file (or `data`), overridden by `SERVING_*` variables.

    Raises ConfigError whose message names every bad path, e.g. `models[0].engine_args.max_modl_len`.
    """
    raw = data
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, not {type(raw).__name__}")
    token = _FILE_DATA.set(raw or {})
    try:
        config = ServingConfig()
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=str(path or "configuration"))) from exc
    finally:
        _FILE_DATA.reset(token)
    if check_vllm:
        from serving.engine.vllm_args import check_vllm_names

        problems = [p for i, m in enumerate(config.models) for p in check_vllm_names(m, f"models[{i}]")]
        if problems:
            raise ConfigError("\n".join(problems))
    return config


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} error(s)"]
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def suggest(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def dump_config(config: ServingConfig) -> str:
    """The effective configuration as YAML (what `serving config check` prints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """The configuration reference (README's table), generated from the models themselves."""
    sections: list[tuple[str, type[BaseModel]]] = [
        ("top level", ServingConfig), ("gateway", GatewayConfig), ("models[]", ModelConfig),
        ("models[].autoscaling", Autoscaling), ("models[].resources", Resources), ("redis", RedisConfig),
        ("cache", CacheConfig), ("responses", ResponsesConfig), ("files", FilesConfig), ("batches", BatchesConfig),
        ("auth", AuthConfig), ("auth.keys[]", APIKeySpec),
        ("limits", LimitsConfig)]
    lines = []
    for title, model in sections:
        lines += [f"#### `{title}`", "", "| field | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = str(field.annotation).replace("typing.", "").replace("serving.config.", "")
            kind = getattr(field.annotation, "__name__", kind) if "[" not in kind and "|" not in kind else kind
            kind = kind.replace(" | ", " or ").replace("<class '", "").replace("'>", "")
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = f"`{field.default_factory()!r}`" if field.default_factory in (dict, list) else "see below"
            else:
                default = f"`{field.default!r}`"
            lines.append(f"| `{name}` | `{kind}` | {default} | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines)
