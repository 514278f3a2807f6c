"""The page at GET /: upload a photo or pick a rendered scene, see every model's caption and time,
greedy or by beam search.

One HTML file with its script and style inline (no CDN: it works offline). Scenes are drawn at
start-up with the built-in dataset's renderer (fixed seed), each with the caption the dataset's
generator writes for it. A picked scene is captioned by every model: grid-feature models read its
image, bottom-up models the region features the built-in dataset's generator makes for that scene
(`scene_regions`), as the demo's models were trained on. Every text the page shows is set with textContent,
never as HTML.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from satic.captioner import Captioner

SCENE_SEED = 20261202


@dataclass(frozen=True)
class RenderedScene:
    png: bytes
    caption: str  # what the dataset's generator says about it
    scene: Any  # satic.data.synth.Scene
    index: int


def render_scenes(count: int, seed: int = SCENE_SEED) -> list[RenderedScene]:
    from satic.data.synth import make_caption, render, sample_scene

    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        scene = sample_scene(rng)
        buffer = io.BytesIO()
        render(scene).save(buffer, format="PNG")
        out.append(RenderedScene(buffer.getvalue(), " ".join(make_caption(rng, scene)), scene, index))
    return out


def scene_regions(rendered: RenderedScene, captioner: Captioner) -> np.ndarray:
    """(N, D) region features of a rendered scene for a bottom-up model, as `satic synth` makes them for
    its images (the generator's fixed projection for the model's feature size, the checkpoint's
    norm_att_feat / use_box applied); the same scene gives the same regions on every call."""
    from satic.data.stores import BOX_GEOMETRY, prepare_regions
    from satic.data.synth import CANVAS, Projection, region_features

    spec = captioner.features
    dim = captioner.feature_dim - (BOX_GEOMETRY if spec.use_box else 0)
    rng = np.random.default_rng([SCENE_SEED, 1, rendered.index])
    att, boxes = region_features(rng, rendered.scene, Projection.for_dim(dim))
    return prepare_regions(att, boxes, (CANVAS, CANVAS), spec.norm_att_feat, spec.use_box)


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
  #shown[hidden] { display: none; }
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
<p class="hint">Pick a rendered scene of the built-in dataset, or upload a photo; every loaded model
captions it. Models trained on region features read the scene's generated regions, and only models
trained on the bundled backbone's features read photos. Times are the server's, from receiving the
request to answering it.</p>
<label>Photo: <input type="file" id="file" accept="image/*"></label>
<label>Decoding: <select id="decoding">
  <option value="1">greedy</option>
  <option value="3">beam search, 3 beams</option>
  <option value="5">beam search, 5 beams</option>
</select></label>
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
  results.append(card);
  return {model: model, card: card, caption: caption, ms: ms};
});

let current = 0;
let again = null;  // captions the image on show again, when the decoding changes
const decoding = document.getElementById("decoding");
decoding.addEventListener("change", function () { if (again) again(); });
function show(source, reference) {
  document.getElementById("shown").hidden = false;
  const preview = document.getElementById("preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = source;
  document.getElementById("reference").textContent = reference ? "scene: " + reference : "";
}

function ask(card, request, body) {
  card.caption.className = "caption";
  card.caption.textContent = "\u2026";
  card.ms.textContent = "";
  fetch("/v1/captions", body instanceof FormData ? {method: "POST", body: body}
        : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
    .then(function (r) { return r.json().then(function (answer) { return {ok: r.ok, body: answer}; }); })
    .then(function (answer) {
      if (request !== current) return;
      if (answer.ok) {
        card.caption.textContent = answer.body.captions[0];
        card.ms.textContent = answer.body.ms.toFixed(1) + " ms";
      } else {
        card.caption.className = "caption error";
        card.caption.textContent = answer.body.error;
      }
    })
    .catch(function (err) {
      if (request !== current) return;
      card.caption.className = "caption error";
      card.caption.textContent = "no answer from the server: " + err;
    })
    .finally(function () {
      if (request === current) document.body.dataset.pending = Number(document.body.dataset.pending) - 1;
    });
}

function captionPhoto(file) {
  const request = ++current;
  again = function () { captionPhoto(file); };
  show(URL.createObjectURL(file), "");
  const readers = cards.filter(function (c) { return c.model.images; });
  document.body.dataset.pending = readers.length;
  cards.forEach(function (c) {
    if (!c.model.images) {
      c.caption.className = "caption";
      c.caption.textContent = "reads precomputed " + c.model.features + " features, not images";
      c.ms.textContent = "";
      return;
    }
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("model", c.model.name);
    form.append("beam_size", decoding.value);
    ask(c, request, form);
  });
}

function captionScene(index) {
  const request = ++current;
  again = function () { captionScene(index); };
  show(DATA.scenes[index].url, DATA.scenes[index].caption);
  document.body.dataset.pending = cards.length;
  cards.forEach(function (c) {
    ask(c, request, {scene: index, model: c.model.name, beam_size: Number(decoding.value)});
  });
}

document.getElementById("file").addEventListener("change", function (event) {
  const file = event.target.files[0];
  if (file) captionPhoto(file);
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
  button.addEventListener("click", function () { captionScene(i); });
  scenes.append(button);
});
</script>
</body>
</html>
"""
