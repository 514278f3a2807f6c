"""`satic serve`: caption over HTTP, with concurrent requests decoded together (dynamic batching)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

from satic.cli import HelpFormatter, add_threads_argument, positive_int, use_threads, whole_number
from satic.errors import SaticError
from satic.serve.settings import Limits, ServeSettings

EPILOG = """\
Endpoints: GET /health, GET /v1/models (what each model reads), POST /v1/captions (JSON
{"features": [...], "model", "beam_size", ... the other decoding options of satic caption but --seed, by their
Python names (top_k for --top-k), and "return_scores"}, or {"scene": i} for a rendered scene, or multipart with one
or more 'image' files for checkpoints trained on features of the bundled backbone), GET /metrics (Prometheus),
GET / (a page to try the models on a photo or a rendered scene). The first checkpoint is the default model.
SIGTERM (or Ctrl-C) stops taking new requests, lets the ones in flight finish (for --shutdown-timeout seconds at
most; a second signal answers them with 503 at once) and exits. docs/serving.md has examples and how to run several
replicas."""


def checkpoint_spec(text: str) -> tuple[str, list[Path]]:
    """'NAME=DIR', 'DIR' (the name is then the directory's name) or 'NAME=DIR,DIR,...' (an ensemble of those
    checkpoints, averaged as `satic eval` does with several --checkpoint; a DIR that exists is taken whole,
    commas included)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    directories = [Path(path)] if Path(path).exists() or "," not in path else [Path(p) for p in path.split(",")]
    if len(directories) > 1 and not name:
        raise argparse.ArgumentTypeError(f"{text!r}: name an ensemble, as NAME=DIR,DIR")
    name = name or directories[0].resolve().name
    if not name or any(c.isspace() or c in "/\\" for c in name):
        raise argparse.ArgumentTypeError(f"model name {name!r} in {text!r}: use NAME=DIR with a name without "
                                         "spaces or slashes")
    return name, directories


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < math.inf:  # inf would be a body limit no integer holds, or a batch wait that never ends
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    settings, limits = ServeSettings(), Limits()
    parser = argparse.ArgumentParser(prog="satic serve", description="caption over HTTP with dynamic batching",
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, type=checkpoint_spec, metavar="[NAME=]DIR",
                        help="a checkpoint to serve as NAME (default: the directory's name); repeat for more; "
                             "NAME=DIR,DIR,... serves an ensemble of those checkpoints as one model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=tcp_port, default=8000, help="TCP port (0: any free one)")
    parser.add_argument("--max-batch", type=positive_int, default=settings.max_batch,
                        help="images decoded together at most (1: every request on its own)")
    parser.add_argument("--max-wait-ms", type=non_negative_float, default=settings.max_wait_ms,
                        help="how long a request waits for others to join its batch")
    parser.add_argument("--max-queue", type=positive_int, default=settings.max_queue,
                        help="images waiting at most; a request beyond that gets 503 with Retry-After")
    parser.add_argument("--max-images", type=positive_int, default=limits.max_images,
                        help="images in one request at most")
    parser.add_argument("--max-regions", type=positive_int,
                        help="regions of one image sent as features at most, a larger image gets 413 (default: "
                             f"{limits.max_regions}, or a grid model's own region count where that is more)")
    parser.add_argument("--max-body-mb", type=non_negative_float, default=settings.max_body_bytes / 2**20,
                        help="request body size limit")
    parser.add_argument("--header-timeout", type=non_negative_float, default=settings.header_timeout_s,
                        help="seconds a connection gets to send a request's headers, from its opening or its previous "
                             "answer, else it is closed (0: no limit)")
    parser.add_argument("--body-timeout", type=non_negative_float, default=settings.body_timeout_s,
                        help="seconds a request's body may take to arrive after its headers, else 408 (0: no limit)")
    parser.add_argument("--send-timeout", type=non_negative_float, default=settings.send_timeout_s,
                        help="seconds a connection's answers may wait for its client to read them, without any being "
                             "read, else it is closed (0: no limit)")
    parser.add_argument("--shutdown-timeout", type=non_negative_float, default=60.0,
                        help="seconds the requests in flight get to finish after SIGTERM or Ctrl-C")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                        help="weights and arithmetic of the decoders")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_threads_argument(parser)
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                        help="server log level (info logs every request)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    names = [name for name, _ in args.checkpoint]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise SaticError(f"two checkpoints are named {duplicate!r}; name them with --checkpoint NAME=DIR")
    if args.max_queue < args.max_images:  # such a request would get 503 "retry" however often it came back
        raise SaticError(f"--max-queue {args.max_queue} is less than --max-images {args.max_images}: a request of "
                         f"more than {args.max_queue} images could never be queued; raise --max-queue or lower "
                         "--max-images")
    try:
        import uvicorn

        from satic.serve import create_app
    except ImportError as err:
        raise SaticError(f"satic serve needs the serve extra ({err}); install it with pip install '.[serve]' in "
                         "the satic checkout")
    # the multipart parser logs each malformed body it refuses: the client gets that as its 400, and the
    # server's log would get a line without a request to tell whose
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    use_threads(args.threads)
    raise_open_file_limit()
    models = load_models(args.checkpoint, args.precision, args.device)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_body_bytes=int(args.max_body_mb * 2**20),
                             body_timeout_s=args.body_timeout,
                             limits=Limits(max_images=args.max_images,
                                           max_regions=args.max_regions or default_max_regions(models)))
    app = create_app(models, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    return run_server(uvicorn.Server(config), app, args)


def run_server(server, app, args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C; a batch still decoding after --shutdown-timeout is abandoned."""
    # uvicorn handles SIGTERM/SIGINT itself (no new connections, in-flight requests finish) and then
    # re-raises the signal to the previous handler: for SIGTERM that is a clean exit here.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    batcher, stop, signals = app.state.service.batcher, server.handle_exit, []
    if args.header_timeout or args.send_timeout:
        server.on_tick = watch_connections(server, args.header_timeout, args.send_timeout, app.state.service.metrics)

    def stop_and_drain(signum, frame) -> None:
        """The first SIGTERM or Ctrl-C stops the server gracefully, and no queued request waits for company; a
        second one answers every request still waiting with 503 at once and closes the connections of clients
        still sending or reading nothing (uvicorn's own forced exit would skip the application's shutdown and wait
        for the batch's thread)."""
        signals.append(signum)
        loop = asyncio.get_running_loop()  # the handler runs on the loop's thread, between two of its steps
        if len(signals) == 1:
            stop(signum, frame)
            batcher.drain()
            # before uvicorn's own deadline (it starts its clock later), which would cancel a request still writing
            loop.call_soon_threadsafe(loop.call_later, args.shutdown_timeout, close_stalled, server, False)
        else:
            batcher.abandon()
            loop.call_soon_threadsafe(close_stalled, server, True)

    server.handle_exit = stop_and_drain  # the handler uvicorn installs for SIGTERM and SIGINT
    startup = server.startup

    async def startup_saying_why_connections_wait(*args, **kwargs):
        asyncio.get_running_loop().set_exception_handler(accept_failures_in_one_line())
        return await startup(*args, **kwargs)

    server.startup = startup_saying_why_connections_wait
    interrupted = False
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C, raised again by uvicorn once it has stopped
        interrupted = True
    except SystemExit:  # uvicorn exits when it cannot bind, after logging why
        if server.started:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        if interrupted:  # stopped while starting: not a failure to listen
            raise KeyboardInterrupt
        raise SaticError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this machine?)")
    if batcher.busy:  # a batch outlived the shutdown timeout or a second signal: do not wait for its thread
        when = "at a second signal" if len(signals) > 1 else f"after --shutdown-timeout {args.shutdown_timeout:g} s"
        print(f"satic serve: a batch still decoding {when} was abandoned; exiting", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + signal.SIGINT if interrupted else 0)  # an exit's join of the batch's thread would wait for it
    if interrupted:
        raise KeyboardInterrupt
    return 0


def close_stalled(server, sending_too: bool) -> None:
    """Close the connections that would hold the shutdown however long it waited: a client that reads no answer
    (the server's writes to it are paused) or has no request in flight, and with `sending_too` (a second signal)
    one still sending its request. uvicorn waits for every connection to close, then cancels the requests still
    running, and a request cancelled while it writes to a client that reads nothing ends in a traceback. (The
    names are uvicorn's h11 and httptools protocols'; a version without them has nothing closed here.)"""
    for connection in open_connections(server):
        cycle, flow = connection.cycle, getattr(connection, "flow", None)
        if (between_requests(cycle) or getattr(flow, "write_paused", False)
                or (sending_too and getattr(cycle, "more_body", False))):
            connection.transport.abort()


def open_connections(server) -> list:
    """The server's open connections: those of uvicorn's h11 and httptools protocols, which hold the request in
    flight as `cycle` (a version without them has none here)."""
    connections = getattr(getattr(server, "server_state", None), "connections", ())
    return [connection for connection in list(connections) if hasattr(connection, "cycle")]


def between_requests(cycle) -> bool:
    """Whether a connection whose request in flight is `cycle` has none: no request yet, or its answer sent."""
    return cycle is None or getattr(cycle, "response_complete", False)


def watch_connections(server, header_timeout_s: float, send_timeout_s: float, metrics):
    """`server.on_tick` (uvicorn calls it ten times a second while it serves), closing the connections that would
    otherwise be held for as long as their clients liked (uvicorn times neither):
    - one whose next request's headers have not all arrived `header_timeout_s` after it opened or after its
      previous answer was sent: a client that connects and sends nothing, or trickles its headers;
    - one whose answers wait to be sent and have not moved for `send_timeout_s`: a client that reads nothing.
    A limit of 0 is none. A connection whose request is arriving or being decoded is the body timeout's and the
    batcher's."""
    tick, waiting = server.on_tick, {}  # connection -> (what it waits for, since when)

    async def on_tick(counter: int) -> bool:
        now, seen = time.monotonic(), {}
        for connection in open_connections(server):
            cycle, transport = connection.cycle, connection.transport
            unsent = transport.get_write_buffer_size()
            if unsent:  # any change means the client reads
                state, limit, kind = ("send", cycle, unsent), send_timeout_s, "send"
            elif transport.is_closing() or not between_requests(cycle):
                continue  # going away, or its request is arriving, being decoded or answered
            else:
                state, limit, kind = ("headers", cycle), header_timeout_s, "header"
            first = waiting.get(connection)
            since = first[1] if first is not None and first[0] == state else now
            seen[connection] = (state, since)
            if limit and now - since >= limit:
                transport.abort()
                metrics.connection_timeout(kind)
        waiting.clear()
        waiting.update(seen)
        return await tick(counter)

    return on_tick


def raise_open_file_limit() -> None:
    """Every connection is an open file: lift the soft limit (often 1024) to the hard one (often far more), so that
    clients, not the server's defaults, decide how many connections it holds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # a system that allows less than it says (macOS)
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def accept_failures_in_one_line(every_s: float = 60.0):
    """The event loop's exception handler: while the server has no file descriptor left for a new connection,
    asyncio retries accept() each second and logs a traceback each time; this says why in one line, once a
    minute, and leaves every other error to asyncio's handler."""
    said = [-math.inf]

    def handle(loop, context: dict) -> None:
        error = context.get("exception")
        retry = getattr(getattr(context.get("handle"), "_callback", None), "__name__", "")
        if retry == "_start_serving" and isinstance(error, ValueError):
            return  # one of the retries asyncio queued (one per waiting connection) ran after the server closed
        if context.get("message") != "socket.accept() out of system resource" or not isinstance(error, OSError):
            loop.default_exception_handler(context)
            return
        if time.monotonic() - said[0] >= every_s:
            said[0] = time.monotonic()
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            print(f"satic serve: cannot accept new connections: {error.strerror} (the open-file limit is {limit}); "
                  "they wait until others close: raise the limit (ulimit -n), or put a proxy in front "
                  "(docs/serving.md)", file=sys.stderr, flush=True)

    return handle


def default_max_regions(models: dict) -> int:
    """Limits' regions per image (1024), or more where a grid model's extractor makes more (a large --size), so that its
    own features, sent as JSON, are never refused."""
    grids = [(-(-captioner.extractor().settings.size // 32)) ** 2  # one region per 32 x 32 pixels
             for captioner in models.values() if captioner.features.kind == "grid"]
    return max([Limits().max_regions, *grids])


def load_models(specs: list[tuple[str, list[Path]]], precision: str, device: str) -> dict:
    """{name: Captioner} of the --checkpoint specs, each warmed up (and its extractor built) before serving."""
    from satic.captioner import Captioner

    models = {}
    for name, directories in specs:
        captioner = Captioner.load(directories, precision, device)  # one, or an ensemble
        captioner.name = name  # messages name the model, never the server's paths
        if captioner.features.kind == "grid":
            captioner.extractor()  # built now: a missing backbone fails here, not on the first upload
        warm_up(captioner)
        models[name] = captioner
        members = f", an ensemble of {len(directories)}" if len(directories) > 1 else ""
        print(f"satic serve: model {name!r}: K={captioner.config.group_size}, {captioner.features.kind} features "
              f"of {captioner.feature_dim}{', takes images' if captioner.features.kind == 'grid' else ''}{members}",
              file=sys.stderr)
    return models


def tcp_port(text: str) -> int:
    """argparse type for --port: refused here, not by a traceback from the socket layer."""
    value = whole_number(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {value}")
    return value


def warm_up(captioner) -> None:
    """One caption of zeros, so the first request does not pay for recording the decoding step."""
    import numpy as np

    captioner.caption([np.zeros((1, captioner.feature_dim), dtype=np.float32)])
