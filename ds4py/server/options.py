"""Server options: every `ds4py serve` knob in one dataclass, plus the argparse flags for it.

Owns the option names, defaults and the flag spelling; `ds4py.cli` only forwards its `serve`
subcommand here. Does not open the model or the KV store (see `app.serve` and `worker`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

DEFAULT_MODEL = "ds4flash.gguf"
MODEL_ID = "deepseek-v4-flash"


@dataclass
class ServerOptions:
    model: str = DEFAULT_MODEL  # GGUF path; ignored with demo=True
    demo: bool = False  # serve Engine.demo(): tiny random weights, real tokenizer
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    host: str = "127.0.0.1"
    port: int = 8000
    ctx: int = 32768  # tokens of KV allocated for the one live session
    max_tokens: int = 393216  # default output limit when a request names none
    api_key: str | None = None  # when set: Authorization: Bearer KEY or x-api-key: KEY
    cors: bool = False
    max_body_mb: int = 64
    keepalive_s: float = 5.0  # SSE comment interval while a prompt is being prefilled
    tool_memory_max_ids: int = 100000
    exact_dsml_replay: bool = True
    kv_disk_dir: str | None = None  # None disables the disk KV store
    kv_disk_space_mb: int = 4096
    kv_cache_min_tokens: int = 512
    kv_cache_cold_max_tokens: int = 30000
    kv_cache_continued_interval_tokens: int = 10000
    kv_cache_boundary_trim_tokens: int = 32
    kv_cache_boundary_align_tokens: int = 2048
    log_level: str = "info"
    model_id: str = MODEL_ID  # the id listed by /v1/models (any requested name is echoed)

    def __post_init__(self) -> None:
        if self.ctx < 16:
            raise ValueError(f"ctx must be at least 16 tokens, got {self.ctx}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_body_mb < 1:
            raise ValueError(f"max_body_mb must be >= 1, got {self.max_body_mb}")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServerOptions:
        """Build options from an argparse namespace made by `add_arguments`."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names and v is not None})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `serve` flags (ds4-server spelling where one exists) to a parser."""
    d = ServerOptions()
    p.add_argument("-m", "--model", default=d.model, help="GGUF model file (default %(default)s)")
    p.add_argument("--demo", action="store_true", help="serve a tiny random-weight model")
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto (default %(default)s)")
    p.add_argument("--host", default=d.host, help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("-c", "--ctx", type=int, default=d.ctx, help="context size in tokens")
    p.add_argument(
        "-n",
        "--tokens",
        dest="max_tokens",
        type=int,
        default=d.max_tokens,
        help="default max output tokens per request",
    )
    p.add_argument("--api-key", default=None, help="require this key (Bearer or x-api-key)")
    p.add_argument("--cors", action="store_true", help="send permissive CORS headers")
    p.add_argument("--max-body-mb", type=int, default=d.max_body_mb)
    p.add_argument("--tool-memory-max-ids", type=int, default=d.tool_memory_max_ids)
    p.add_argument(
        "--disable-exact-dsml-tool-replay",
        dest="exact_dsml_replay",
        action="store_false",
        default=True,
    )
    p.add_argument("--kv-disk-dir", default=None, help="enable the disk KV cache in DIR")
    p.add_argument("--kv-disk-space-mb", type=int, default=d.kv_disk_space_mb)
    p.add_argument("--kv-cache-min-tokens", type=int, default=d.kv_cache_min_tokens)
    p.add_argument("--kv-cache-cold-max-tokens", type=int, default=d.kv_cache_cold_max_tokens)
    p.add_argument(
        "--kv-cache-continued-interval-tokens",
        type=int,
        default=d.kv_cache_continued_interval_tokens,
    )
    p.add_argument(
        "--kv-cache-boundary-trim-tokens", type=int, default=d.kv_cache_boundary_trim_tokens
    )
    p.add_argument(
        "--kv-cache-boundary-align-tokens", type=int, default=d.kv_cache_boundary_align_tokens
    )
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning"])
