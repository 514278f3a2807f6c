"""`satic serve`: captions over HTTP with dynamic batching (needs the serve extra: `pip install '.[serve]'`).

- `app.py`: `create_app({name: Captioner}, ServeSettings()) -> FastAPI` (endpoints, error bodies, body limit)
- `batcher.py`: `Batcher`, the queue that merges concurrent requests of one model and options
- `inputs.py`: checks of a request's fields, features and image files (`BadRequest`)
- `settings.py`: `ServeSettings` and `Limits`, what a server allows and how it batches
- `metrics.py`: `ServeMetrics`, the counters and histograms behind GET /metrics
- `page.py`: the page at GET / and the rendered scenes it offers
"""
from satic.serve.batcher import Batcher
from satic.serve.settings import Limits, ServeSettings

__all__ = ["Batcher", "Limits", "ServeSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # the web framework is imported only when an app is made
        from satic.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'satic.serve' has no attribute {name!r}")
