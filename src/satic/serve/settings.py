"""What a server allows and how it batches: the defaults of `satic serve`'s options (no web framework needed)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    max_images: int = 32  # images in one request
    max_regions: int = 1024  # regions of one image sent as features (an encoder's cost grows with their square)
    max_beam_size: int = 16
    max_image_pixels: int = 40_000_000  # width x height of one uploaded image


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32  # images decoded together at most
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for others to join its batch
    max_queue: int = 256  # images waiting at most; more get 503
    max_body_bytes: int = 64 * 2**20  # request body; larger gets 413
    header_timeout_s: float = 60.0  # seconds a connection may take to send a request's headers (0: any)
    body_timeout_s: float = 60.0  # seconds a request's body may take to arrive after its headers (0: any)
    send_timeout_s: float = 60.0  # seconds a connection's unsent answers may wait for the client to read (0: any)
    limits: Limits = field(default_factory=Limits)
    scenes: int = 6  # rendered scenes offered on the page
    retry_after_s: int = 1  # Retry-After of a 503
