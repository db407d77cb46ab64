"""``lipsync-cluster gateway``: serve the browser page, its WebRTC offers and its WebSocket."""
from __future__ import annotations

import os
from typing import Optional

import click

DEFAULT_BROKER = os.environ.get("LIPSYNC_BROKER", "tcp://127.0.0.1:5555")


@click.command("gateway")
@click.option("--port", type=click.IntRange(1, 65535), default=8086, show_default=True, help="HTTP port.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface; browsers allow the microphone "
                   "only on localhost or over HTTPS, see --cert).")
@click.option("--broker", "endpoint", default=DEFAULT_BROKER, show_default=True, envvar="LIPSYNC_BROKER",
              help="The broker's client endpoint.")
@click.option("--batch-size", type=click.IntRange(1, 25), default=5, show_default=True,
              help="Frames per request (smaller: lower latency, more requests).")
@click.option("--format", "fmt", type=click.Choice(["jpeg", "png"]), default="jpeg", show_default=True,
              help="Image format of the frames sent to the browser.")
@click.option("--quality", type=click.IntRange(1, 100), default=80, show_default=True, help="JPEG quality.")
@click.option("--max-queue", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Frames queued per browser before the oldest is dropped.")
@click.option("--max-sessions", type=click.IntRange(1, 10000), default=64, show_default=True,
              help="Concurrent browser sessions.")
@click.option("--lookahead-frames", type=click.IntRange(0, 12), default=12, show_default=True,
              help="Frames of future audio a batch waits for (12 = exact; fewer = lower latency, see "
                   "docs/STREAMING.md).")
@click.option("--webrtc-kbps", type=click.IntRange(100, 20000), default=1500, show_default=True,
              help="WebRTC video bit rate per viewer (H.264 or VP8; POST /webrtc/offer needs the webrtc extra).")
@click.option("--webrtc-batching", type=click.Choice(["adaptive", "fixed"]), default="adaptive", show_default=True,
              help="WebRTC sessions: adaptive sends the frames whose lookahead is in while no batch is in flight "
                   "(lower latency; batches grow with the round trip), fixed waits for whole --batch-size batches.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS certificate (PEM).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS private key (PEM).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="A host name the page is served under (repeatable). IP addresses and localhost are always "
                   "served; any other name is refused unless listed (DNS rebinding).")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="URL",
              help="Another origin whose pages may open streams, e.g. https://app.example.com (repeatable). "
                   "By default only the gateway's own page may.")
def gateway(port: int, host: str, endpoint: str, batch_size: int, fmt: str, quality: int, max_queue: int,
            max_sessions: int, lookahead_frames: int, webrtc_kbps: int, webrtc_batching: str, cert: Optional[str], key: Optional[str],
            allow_hosts: tuple[str, ...] = (), allow_origins: tuple[str, ...] = ()) -> None:
    """Serve a page where you talk into the microphone and an avatar speaks back, live.

    \b
    Examples:
      lipsync-cluster gateway --port 8086
      lipsync-cluster gateway --host 0.0.0.0 --port 8443 --cert cert.pem --key key.pem --broker tcp://10.0.0.5:5555
    """
    import ssl

    from aiohttp import web

    from ..common.logs import setup_logging
    from .server import make_app

    setup_logging("info", "gateway")
    ssl_context = None
    if cert or key:
        if not (cert and key):
            raise click.BadParameter("give both --cert and --key", param_hint="--cert/--key")
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(cert, key)
    app = make_app(endpoint, batch_size=batch_size, format=fmt, quality=quality if fmt == "jpeg" else None,
                   max_queue=max_queue, max_sessions=max_sessions, allowed_hosts=allow_hosts,
                   allowed_origins=allow_origins, lookahead_frames=lookahead_frames, webrtc_video_kbps=webrtc_kbps,
                   webrtc_batching=webrtc_batching)
    scheme = "https" if ssl_context else "http"
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    click.echo(f"🎙️  lipsync-cluster gateway: open {scheme}://{shown}:{port}/  (broker {endpoint})")
    try:
        web.run_app(app, host=host, port=port, ssl_context=ssl_context, print=None, handle_signals=True)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


__all__ = ["gateway"]
