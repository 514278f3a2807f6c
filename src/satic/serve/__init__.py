"""`satic serve`: captions over HTTP with dynamic batching (needs the serve extra: `pip install '.[serve]'`).

- `app.py`: `create_app({name: Captioner}, ServeSettings()) -> FastAPI` (endpoints, error bodies, body limit)
- `batcher.py`: `Batcher`, the queue that merges concurrent requests of one model and options
- `inputs.py`: checks of a request's fields, features and image files (`BadRequest`)
- `metrics.py`: `ServeMetrics`, the counters and histograms behind GET /metrics
- `page.py`: the page at GET / and the rendered scenes it offers
"""
from satic.serve.app import ServeSettings, create_app
from satic.serve.batcher import Batcher
from satic.serve.inputs import Limits

__all__ = ["Batcher", "Limits", "ServeSettings", "create_app"]
