"""``lorakit serve --base M [--adapter NAME=DIR …] [--adapter-root DIR] [--data-root DIR] [--host 127.0.0.1] [--port 8000]``.

An OpenAI-compatible server (:mod:`lorakit.serve.http`) over one base model and many adapters:
``model`` in a request names an adapter, or the base model (``--served-model-name``, default
``--base`` as given) for none. Requests for different adapters share one continuous batch.
The page at ``/`` (:mod:`lorakit.serve.page`) puts the models' answers side by side and compares
them on a data file; ``--data-root DIR`` lets it pick files from DIR (uploads need nothing).

Notable:

- Binds 127.0.0.1 unless ``--host`` says otherwise; a non-loopback host without ``--api-key``
  (or ``LORAKIT_API_KEY``) gets a warning.
- ``--adapter-root DIR`` turns on ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``,
  for safetensors adapters under DIR only. Adapters given with ``--adapter`` may live anywhere.
- ``--max-loaded N`` adapters are resident at once (more are swapped in, least recently used
  first); ``--max-batch`` requests run together and ``--max-queue`` more wait before 429.
- ``--prefix-cache-mb N``: memory for the keys/values of prompt prefixes already computed, per
  adapter (a multiple-choice question's context, a system prompt); 0 turns the cache off.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import sys
from pathlib import Path

from lorakit.commands.flags import non_negative_int, port, positive_int
from lorakit.serve import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_PREFIX_CACHE_BYTES

API_KEY_ENV = "LORAKIT_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="M", help="base model: hub id, folder, .gguf file or alias")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve the adapter in DIR as model NAME; repeat for several")
    parser.add_argument("--adapter-root", metavar="DIR",
                        help="allow loading adapters at run time, from folders under DIR only")
    parser.add_argument("--data-root", metavar="DIR",
                        help="let the page's compare view read data files under DIR (and under --adapter-root)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=port, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", metavar="K", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer K' on /v1/* (default: ${API_KEY_ENV}, if set)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the base model's name in the API (default: --base)")
    parser.add_argument("--max-loaded", type=positive_int, default=8, metavar="N", help="adapters resident at once (default 8)")
    parser.add_argument("--max-rank", type=positive_int, default=16, metavar="R",
                        help="largest adapter rank accepted (default 16)")
    parser.add_argument("--max-batch", type=positive_int, default=32, metavar="N", help="requests decoded together (default 32)")
    parser.add_argument("--max-queue", type=non_negative_int, default=DEFAULT_MAX_QUEUE, metavar="N",
                        help=f"requests waiting beyond --max-batch before answering 429 (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--max-context", type=positive_int, metavar="N",
                        help="context length per request (default: the model's)")
    parser.add_argument("--prefix-cache-mb", type=non_negative_int, default=DEFAULT_PREFIX_CACHE_BYTES >> 20, metavar="N",
                        help=f"memory for cached prompt prefixes, per server (default {DEFAULT_PREFIX_CACHE_BYTES >> 20}; "
                             "0: off)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES, metavar="B",
                        help="largest request body; 413 above it (default 4 MiB)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weights dtype (default: by device)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    check_port_free(args.host, args.port)  # before minutes of model loading, not after
    app = build_app(args)
    served = [app.state.server.model_name, *app.state.server.engine.registry.names()]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {', '.join(served)} at http://{host}:{args.port}/v1 (the page: http://{host}:{args.port}/)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def build_app(args: argparse.Namespace):
    """The server's ASGI app for parsed ``lorakit serve`` arguments (the model and adapters loaded).

    Raises:
        LorakitError: a bad flag, folder or adapter.
    """
    from lorakit.errors import LorakitError

    adapters = parse_adapters(args.adapter)
    for flag, folder in (("--adapter-root", args.adapter_root), ("--data-root", args.data_root)):
        if folder is not None and not Path(folder).is_dir():
            raise LorakitError(f"{flag} {folder} is not a folder")
    if not _is_loopback(args.host) and not args.api_key:
        print(f"warning: binding {args.host} without --api-key: anyone who can reach this port can use the "
              "server", file=sys.stderr)

    from lorakit.serve.engine import Engine
    from lorakit.serve.http import create_app

    name = args.served_model_name or args.base
    if name in adapters:
        raise LorakitError(f"--adapter {name}=…: that name is the base model's; choose another")
    print(f"loading {args.base} and {len(adapters)} adapter(s) …", file=sys.stderr)
    engine = Engine.from_pretrained(args.base, adapters, dtype=args.dtype, device=args.device,
                                    max_batch=args.max_batch, max_resident=args.max_loaded,
                                    max_rank=args.max_rank, max_context=args.max_context,
                                    prefix_cache_bytes=max(0, args.prefix_cache_mb) << 20)
    return create_app(engine, name, api_key=args.api_key, adapter_root=args.adapter_root, data_root=args.data_root,
                      max_queue=args.max_queue, max_body_bytes=args.max_body_bytes)


def check_port_free(host: str, port: int) -> None:
    """Refuse a ``--host``/``--port`` that cannot be bound (in use, or an address not on this machine).

    Raises:
        LorakitError: naming the address and what to do.
    """
    import socket

    from lorakit.errors import LorakitError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise LorakitError(f"--port {port}: {host}:{port} is already in use (another server?); stop it or "
                                   "choose another port with --port") from None
            raise LorakitError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); use an "
                               "address of this machine (default 127.0.0.1) and a port you may open") from None


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``["name=DIR", …]`` as ``{name: DIR}``, names checked, no name twice.

    Raises:
        LorakitError: a spec without ``=``, a bad or repeated name.
    """
    from lorakit.errors import LorakitError
    from lorakit.inject import check_adapter_name

    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not folder:
            raise LorakitError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter sql=runs/sql/adapter")
        check_adapter_name(name)
        if name in adapters:
            raise LorakitError(f"--adapter {name}=…: given twice")
        adapters[name] = folder
    return adapters


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
