"""The adapter's one settings class: every knob comes from ``FHIR_NER_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Environment = Literal["development", "test", "production"]


class Settings(BaseSettings):
    """Configuration for the API, the workers and the CLI.

    Secrets (subscription tokens, EHR credentials) have no defaults: in production they must be set.
    """

    # Errors name the variable and the problem, never the value given: many values here are secrets.
    model_config = SettingsConfigDict(env_prefix="FHIR_NER_", env_file=None, extra="ignore", hide_input_in_errors=True)

    environment: Environment = Field(
        default="development", description="production refuses to start without subscription tokens."
    )

    # Queue and state
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Celery broker, results and note state; with Sentinel, the sentinels as Celery takes them: "
        "sentinel://[:password@]host:26379/db;sentinel://host2:26379 (password and db: the master's).",
    )
    redis_sentinel_master: str | None = Field(
        default=None, description="Name of the Sentinel master group (required with sentinel:// URLs)."
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="Password of the sentinels themselves, when they require one."
    )
    key_prefix: str = Field(default="fhir-ner", description="Prefix of every Redis key the adapter writes.")

    # EHR (FHIR server) the adapter reads notes from and writes results to
    ehr_base_url: str = Field(
        default="http://127.0.0.1:8080/fhir", description="FHIR base URL of the EHR; the only host we fetch from."
    )
    ehr_bearer_token: SecretStr | None = Field(default=None, description="Static bearer token for the EHR.")
    ehr_timeout_seconds: float = Field(default=30.0, description="Timeout of each EHR request.")
    ehr_auth: Literal["bearer", "client-credentials", "smart-backend"] = Field(
        default="bearer", description="How the worker authenticates to the EHR (bearer: the static token, if any)."
    )
    ehr_token_url: str | None = Field(default=None, description="OAuth2 token endpoint of the EHR.")
    ehr_client_id: str | None = Field(default=None, description="OAuth2 / SMART client id.")
    ehr_client_secret: SecretStr | None = Field(default=None, description="Client secret (client-credentials).")
    ehr_private_key_file: Path | None = Field(
        default=None, description="PEM private key for SMART Backend Services (RS384 or ES384)."
    )
    ehr_key_id: str | None = Field(default=None, description="`kid` of the SMART signing key.")
    ehr_jwt_algorithm: Literal["RS384", "ES384"] = "RS384"
    ehr_scope: str | None = Field(default=None, description="OAuth2 scope to request.")
    ehr_retry_attempts: int = Field(default=3, ge=1, description="Attempts per EHR request (429, 5xx, network).")
    ehr_retry_max_delay: float = Field(default=10.0, description="Longest wait between attempts, in seconds.")
    ehr_max_transaction_entries: int | None = Field(
        default=None,
        ge=2,
        description="Largest transaction the EHR accepts (Medplum: 8 with conditional creates); larger write-backs "
        "go as consecutive parts (unset: always one transaction).",
    )
    ehr_breaker_threshold: int = Field(default=5, ge=1, description="Consecutive failures that open the breaker.")
    ehr_breaker_cooldown: float = Field(default=30.0, description="Seconds the breaker stays open.")
    writeback_dir: Path | None = Field(
        default=None, description="Write transaction Bundles into this folder instead of the EHR (demo)."
    )

    # Who may notify us
    subscription_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted bearer tokens for POST /fhir/notify, comma-separated (several for rotation).",
    )
    allow_unauthenticated: bool = Field(
        default=False, description="Accept notifications without a token (development only)."
    )

    # NLP
    model_path: str | None = Field(
        default=None, description="Tagger checkpoint directory; the shipped default model when unset."
    )
    cache_dir: Path | None = Field(
        default=None, description="Where converted encoders are cached (default ~/.cache/fhir-ner/encoders)."
    )
    torch_threads: int | None = Field(default=None, description="CPU threads for PyTorch (default: all cores).")
    thread_wait: Literal["passive", "active"] = Field(
        default="passive",
        description="How a worker process's OpenMP threads (PyTorch's) and the int8 tagger's ONNX Runtime threads "
        "wait between operations (OMP_WAIT_POLICY, set "
        "when the worker starts unless the environment sets it): passive sleeps, active spins. Where the API and "
        "the workers share a machine's cores, spinning threads take CPU from each other (passive: +15-30% notes a "
        "minute end to end on 2 cores); active tags ~5% faster when the inference worker has its cores alone.",
    )
    precision: Literal["auto", "fp32", "int8", "bf16"] = Field(
        default="auto",
        description="Tagger arithmetic: auto = bf16 on a GPU; on a CPU int8 (ONNX Runtime) when the checkpoint "
        "records that its int8 model met the accuracy bar, else bf16 on a CPU with AMX or AVX512-BF16 when it "
        "records that bf16 met it, else fp32.",
    )
    inference_batch_size: int = Field(
        default=8, ge=1, description="Windows per forward pass (halved on out-of-memory, for that worker's life)."
    )
    inference_max_notes: int | None = Field(
        default=None,
        ge=1,
        description="The inference worker tags up to this many waiting notes in one pass (default: 32 on a GPU, "
        "1 on a CPU, where batching gains nothing and only delays the first notes of a batch)...",
    )
    inference_max_wait_ms: int = Field(
        default=50, ge=1, description="...or whatever has arrived after waiting this long for more."
    )

    # Worker runtime (Celery)
    broker_visibility_timeout: int = Field(
        default=3600,
        description="Seconds before a message taken by a worker that vanished (kill -9, lost host) is delivered "
        "again; must exceed the longest task (the hard time limit).",
    )
    broker_restore_interval: int = Field(
        default=10, ge=1, description="How often workers look for such abandoned messages, in seconds."
    )
    lost_message_seconds: int = Field(
        default=300,
        ge=0,
        description="A note whose status has not moved for this long, with its stage's message neither queued nor "
        "held by a worker (lost by a worker killed while taking it), gets that stage sent again by the I/O "
        "workers, which look every half of it; 0 turns the check off.",
    )
    task_soft_time_limit: int = Field(default=600, ge=1, description="A task is asked to stop after this many s.")
    task_time_limit: int = Field(default=660, ge=1, description="A task is killed after this many seconds.")
    task_max_retries: int = Field(
        default=8, ge=0, description="Retries of a job whose EHR calls keep failing before it is dead-lettered."
    )
    task_retry_max_delay: float = Field(
        default=300.0, description="Longest wait between those retries (exponential backoff with jitter), s."
    )
    worker_metrics_port: int | None = Field(
        default=None, description="Port of the worker's Prometheus /metrics (unset: none)."
    )

    # Mapping
    mapping_profile: Path | None = Field(default=None, description="Mapping profile YAML; default built in.")
    identifier_namespace: str = Field(
        default="urn:fhir-ner-adapter:derived", description="System of the identifiers on every resource written."
    )
    terminology: Literal["auto", "embedding", "lexical", "off"] = Field(
        default="auto",
        description="How mentions are coded: auto (nearest neighbour where embeddings are cached, text match "
        "elsewhere), embedding (embed what is missing on first use), lexical (text match only), off.",
    )
    terminology_encoder: str = Field(
        default="multilingual-e5-small", description="Encoder (name or folder) for nearest-neighbour coding."
    )
    terminology_cache_dir: Path | None = Field(
        default=None, description="Where code-system embeddings are cached (default ~/.cache/fhir-ner/terminology)."
    )
    terminology_queries: Literal["distilled", "full"] = Field(
        default="distilled",
        description="How the shipped linker encodes mentions: 'distilled' (four layers trained to imitate the full "
        "encoder, about a quarter of its CPU) or 'full' (the twelve-layer encoder that embedded the index).",
    )
    terminology_rerank: bool = Field(
        default=True,
        description="Re-rank the shipped linker's candidates with the weights fitted on CodiEsp dev "
        "(worker/linker/rerank.json; false: the nearest-neighbour order).",
    )

    # Limits
    max_body_bytes: int = Field(default=5_000_000, description="Larger notification bodies get 413.")
    max_note_chars: int = Field(default=2_000_000, description="Longer notes are skipped with a reason, not cut.")

    # Subscription receiver (issue 5)
    signature_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Shared secrets for the X-Signature header (hex HMAC-SHA256 of the raw body, Medplum), "
        "comma-separated for rotation; a notification with a valid signature needs no bearer token.",
    )
    accept_preliminary: bool = Field(default=False, description="Also process notes with docStatus preliminary.")
    gap_grace_seconds: float = Field(
        default=10.0,
        description="How long a missing event number may stay missing (out-of-order delivery) "
        "before it counts as a gap and is recovered from the EHR.",
    )
    heartbeat_seconds: int = Field(
        default=0,
        description="Heartbeat period assumed for subscriptions the adapter did not create itself "
        "(0: watch only those whose period is known, e.g. from `fhir-ner subscribe`).",
    )
    recovery_check_seconds: float = Field(
        default=5.0, description="How often the API looks for gaps and silent subscriptions (0: never)."
    )
    recovery_retry_seconds: float = Field(
        default=300.0, description="A recovery that has not finished after this long is started again."
    )
    recovery_overlap_seconds: float = Field(
        default=300.0, description="The _lastUpdated fallback searches from this long before the last event seen."
    )

    # Review pages (issue 16): off unless reviewer tokens are configured.
    review_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Reviewer logins for the /review pages, comma-separated name:token pairs (secret); "
        "the pages are off while it is empty.",
    )
    review_session_hours: float = Field(default=12.0, gt=0, description="How long a reviewer's login lasts.")
    review_try_timeout_seconds: float = Field(
        default=60.0, gt=0, description="How long the playground waits for a worker to tag the pasted text."
    )

    # SMART App Launch (EHR launch) of the review pages: off unless a client id is configured.
    smart_client_id: str | None = Field(
        default=None, description="Client id the EHR registered the review pages under; enables /review/launch."
    )
    smart_client_secret: SecretStr | None = Field(
        default=None, description="Client secret (confidential client, client_secret_basic); unset: a public client."
    )
    smart_redirect_url: str | None = Field(
        default=None,
        description="The redirect URL registered with the EHR (https://<adapter>/review/launch/callback); "
        "unset: derived from the launch request's own URL.",
    )
    smart_scope: str = Field(
        default="launch openid fhirUser patient/*.rs", description="Scopes asked for at the EHR launch."
    )
    smart_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins besides the EHR base URL's where its authorization server may live "
        "(comma-separated scheme://host[:port]).",
    )
    smart_frame_ancestors: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins that may frame pages of a launched session (CSP frame-ancestors); "
        "unset: the EHR base URL's origin.",
    )

    @field_validator("smart_allowed_origins", "smart_frame_ancestors", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        if isinstance(value, list):
            for origin in value:
                parts = urlsplit(str(origin))
                if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
                    raise ValueError("SMART origins are scheme://host[:port], comma-separated")
        return value

    def smart_launch_on(self) -> bool:
        return bool(self.smart_client_id)

    @field_validator("review_tokens", mode="before")
    @classmethod
    def _split_review_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            value = [pair.strip() for pair in value.split(",") if pair.strip()]
        if isinstance(value, list):
            for pair in value:
                raw = pair.get_secret_value() if isinstance(pair, SecretStr) else str(pair)
                name, _, token = raw.partition(":")
                if not name.strip() or len(token.strip()) < 8:
                    # Never echo the value: it holds a secret.
                    raise ValueError("FHIR_NER_REVIEW_TOKENS takes name:token pairs with tokens of 8+ characters")
        return value

    def reviewers(self) -> list[tuple[str, str]]:
        """(display name, token) of each configured reviewer."""
        pairs = [pair.get_secret_value().partition(":") for pair in self.review_tokens]
        return [(name.strip(), token.strip()) for name, _, token in pairs]

    @field_validator("subscription_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value

    @field_validator("signature_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        if isinstance(value, str):
            return [secret.strip() for secret in value.split(",") if secret.strip()]
        return value

    @model_validator(mode="after")
    def _time_limits_fit(self) -> Settings:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("FHIR_NER_TASK_SOFT_TIME_LIMIT must be below FHIR_NER_TASK_TIME_LIMIT")
        if self.broker_visibility_timeout <= self.task_time_limit:
            raise ValueError(
                "FHIR_NER_BROKER_VISIBILITY_TIMEOUT must exceed FHIR_NER_TASK_TIME_LIMIT, "
                "or running tasks are delivered a second time"
            )
        return self

    @model_validator(mode="after")
    def _sentinel_needs_a_master(self) -> Settings:
        sentinel = self.redis_url.startswith("sentinel://")
        if sentinel and not self.redis_sentinel_master:
            raise ValueError("FHIR_NER_REDIS_URL lists sentinels: set FHIR_NER_REDIS_SENTINEL_MASTER")
        if self.redis_sentinel_master and not sentinel:
            raise ValueError("FHIR_NER_REDIS_SENTINEL_MASTER needs sentinel:// URLs in FHIR_NER_REDIS_URL")
        return self

    def redis_sentinels(self) -> list[tuple[str, int]]:
        """(host, port) of each sentinel in ``redis_url`` (empty without Sentinel)."""
        from urllib.parse import urlsplit

        found: list[tuple[str, int]] = []
        for part in self.redis_url.split(";"):
            url = urlsplit(part.strip())
            if url.scheme == "sentinel" and url.hostname:
                found.append((url.hostname, url.port or 26379))
        return found

    @model_validator(mode="after")
    def _no_open_door_in_production(self) -> Settings:
        if self.environment == "production":
            if self.allow_unauthenticated:
                raise ValueError("FHIR_NER_ALLOW_UNAUTHENTICATED must not be set in production")
            if not self.subscription_tokens:
                raise ValueError("FHIR_NER_SUBSCRIPTION_TOKENS must be set in production")
        return self

    def accepted_tokens(self) -> list[str]:
        return [token.get_secret_value() for token in self.subscription_tokens]

    def accepted_signature_secrets(self) -> list[bytes]:
        return [secret.get_secret_value().encode() for secret in self.signature_secrets]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings are read once per process; tests call ``get_settings.cache_clear()`` after changing env."""
    return Settings()
