"""The page at GET /: upload a photo or pick a rendered scene, see every model's caption and time.

One HTML file with its script and style inline (no CDN: it works offline). Scenes are drawn at
start-up with the built-in dataset's renderer (fixed seed), each with the caption the dataset's
generator writes for it. Every text the page shows is set with textContent, never as HTML.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from satic.captioner import Captioner

SCENE_SEED = 20261202


@dataclass(frozen=True)
class RenderedScene:
    png: bytes
    caption: str  # what the dataset's generator says about it


def render_scenes(count: int, seed: int = SCENE_SEED) -> list[RenderedScene]:
    from satic.data.synth import make_caption, render, sample_scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scene = sample_scene(rng)
        buffer = io.BytesIO()
        render(scene).save(buffer, format="PNG")
        out.append(RenderedScene(buffer.getvalue(), " ".join(make_caption(rng, scene))))
    return out


def model_summary(name: str, captioner: Captioner) -> dict:
    return {"name": name, "group_size": captioner.config.group_size, "images": captioner.features.kind == "grid",
            "features": captioner.features.kind, "feature_dim": captioner.feature_dim}


def page_html(models: dict[str, Captioner], scenes: list[RenderedScene]) -> str:
    data = {"models": [model_summary(n, c) for n, c in models.items()],
            "scenes": [{"url": f"/scenes/{i}.png", "caption": s.caption} for i, s in enumerate(scenes)]}
    # inside <script>, "</" would end the element: escape every "<"
    embedded = json.dumps(data).replace("<", "\\u003c")
    return PAGE.replace("__DATA__", embedded)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>satic: captions</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 72rem; }
  h1 { font-size: 1.4rem; margin: 0 0 .3rem; }
  .hint { color: #666; margin: 0 0 1rem; }
  .scenes { display: flex; flex-wrap: wrap; gap: .5rem; margin: .5rem 0 1rem; }
  .scenes button { padding: 0; border: 2px solid #ccc; background: none; cursor: pointer; }
  .scenes button:hover, .scenes button:focus { border-color: #36c; }
  .scenes img { display: block; width: 80px; height: 80px; }
  #shown { display: flex; gap: 1.5rem; align-items: flex-start; flex-wrap: wrap; }
  #preview { max-width: 320px; max-height: 320px; border: 1px solid #ddd; }
  #reference { color: #666; font-style: italic; }
  #results { display: flex; gap: 1rem; flex-wrap: wrap; }
  .model { border: 1px solid #ddd; border-radius: 6px; padding: .6rem .8rem; width: 14rem; }
  .model h2 { font-size: 1rem; margin: 0 0 .4rem; }
  .model .caption { font-size: 1.05rem; min-height: 2.6em; }
  .model .ms { color: #666; font-size: .85rem; }
  .model .error { color: #b00; font-size: .9rem; }
  .model.features-only { color: #888; }
</style>
</head>
<body>
<h1>satic: image captions</h1>
<p class="hint">Upload a photo or pick a rendered scene; every loaded model captions it. Times are the
server's, from receiving the request to answering it.</p>
<label>Photo: <input type="file" id="file" accept="image/*"></label>
<div class="scenes" id="scenes"></div>
<div id="shown" hidden>
  <div><img id="preview" alt="the image being captioned"><div id="reference"></div></div>
  <div id="results"></div>
</div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const results = document.getElementById("results");
const cards = DATA.models.map(function (model) {
  const card = document.createElement("div");
  card.className = "model";
  const title = document.createElement("h2");
  title.textContent = model.name + " (K=" + model.group_size + ")";
  const caption = document.createElement("div");
  caption.className = "caption";
  const ms = document.createElement("div");
  ms.className = "ms";
  card.append(title, caption, ms);
  if (!model.images) {
    card.classList.add("features-only");
    caption.textContent = "reads precomputed " + model.features + " features, not images";
  }
  results.append(card);
  return {model: model, card: card, caption: caption, ms: ms};
});

let current = 0;
function captionImage(blob, filename, reference) {
  const request = ++current;
  document.getElementById("shown").hidden = false;
  const preview = document.getElementById("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  document.getElementById("reference").textContent = reference ? "scene: " + reference : "";
  document.body.dataset.pending = cards.filter(function (c) { return c.model.images; }).length;
  cards.forEach(function (c) {
    if (!c.model.images) return;
    c.caption.className = "caption";
    c.caption.textContent = "\\u2026";
    c.ms.textContent = "";
    const form = new FormData();
    form.append("image", blob, filename);
    form.append("model", c.model.name);
    fetch("/v1/captions", {method: "POST", body: form})
      .then(function (r) { return r.json().then(function (body) { return {ok: r.ok, body: body}; }); })
      .then(function (answer) {
        if (request !== current) return;
        if (answer.ok) {
          c.caption.textContent = answer.body.captions[0];
          c.ms.textContent = answer.body.ms.toFixed(1) + " ms";
        } else {
          c.caption.className = "caption error";
          c.caption.textContent = answer.body.error;
        }
      })
      .catch(function (err) {
        if (request !== current) return;
        c.caption.className = "caption error";
        c.caption.textContent = "no answer from the server: " + err;
      })
      .finally(function () {
        if (request === current) document.body.dataset.pending = Number(document.body.dataset.pending) - 1;
      });
  });
}

document.getElementById("file").addEventListener("change", function (event) {
  const file = event.target.files[0];
  if (file) captionImage(file, file.name, "");
});

const scenes = document.getElementById("scenes");
DATA.scenes.forEach(function (scene, i) {
  const button = document.createElement("button");
  button.type = "button";
  button.title = scene.caption;
  button.id = "scene-" + i;
  const img = document.createElement("img");
  img.src = scene.url;
  img.alt = "rendered scene " + i;
  button.append(img);
  button.addEventListener("click", function () {
    fetch(scene.url).then(function (r) { return r.blob(); })
      .then(function (blob) { captionImage(blob, "scene" + i + ".png", scene.caption); });
  });
  scenes.append(button);
});
</script>
</body>
</html>
"""
