"""The HTTP API in process: captions equal the Captioner's and `satic caption`'s, the reference
fixture's captions come back, image uploads work, and every bad input is one clear 4xx."""
from __future__ import annotations

import asyncio
import io
import json
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from satic.cli import main as satic_main
from satic.data.stores import create_store

from serve_helpers import DIM, load, regions, serving, until_cancelled


@pytest.fixture(scope="module")
def client(captioners):
    with serving(captioners, max_body_bytes=200_000,
                 limits={"max_images": 8, "max_image_pixels": 250_000, "max_regions": 40}) as c:
        yield c


def png_bytes(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_lists_the_models(client):
    assert client.get("/health").json() == {"status": "ok", "models": ["tiny", "grid"]}


def test_json_captions_equal_the_captioner_and_satic_caption(client, captioners, tiny_checkpoint, tmp_path):
    feats = regions(np.random.default_rng(0), 5)
    body = {"features": [f.tolist() for f in feats]}
    answer = client.post("/v1/captions", json=body)
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    assert reply["model"] == "tiny" and reply["ms"] > 0
    assert reply["captions"] == captioners["tiny"].caption(feats)

    answer = client.post("/v1/captions", json={**body, "model": "tiny", "beam_size": 3, "max_length": 8})
    store = tmp_path / "feats.h5"
    with create_store(store, "hdf5") as writer:
        for i, f in enumerate(feats):
            writer.add(str(i), f)
    out = tmp_path / "captions.json"
    assert satic_main(["caption", "--checkpoint", str(tiny_checkpoint), "--features", str(store), "--beam-size", "3",
                       "--max-length", "8", "--out", str(out)]) == 0
    assert answer.json()["captions"] == [r["caption"] for r in json.loads(out.read_text())]


@pytest.mark.parametrize("options", [
    {"beam_size": 3, "length_penalty": "wu_0.9", "block_trigrams": True, "remove_bad_endings": True},
    {"beam_size": 4, "beam_groups": 2, "diversity_lambda": 0.7},
    {"decoding_constraint": True, "max_length": 6},
    {"beam_size": 3, "n_best": 3, "return_scores": True},
    {"sample_method": "sample", "sample_n": 3, "temperature": 0.7, "top_k": 4, "return_scores": True},
], ids=["length-penalty", "diverse", "constraint", "n-best", "sampling"])
def test_every_decoding_option_gives_the_captioners_captions(client, captioners, options):
    """The reference's decoding options in a request decode as Captioner.caption does with them (sampling
    from the same seed: two images fill their batch exactly, so the draws are the same); with n_best or
    sample_n each image gets a list, with return_scores each caption its score."""
    feats = regions(np.random.default_rng(1), 2)
    torch.manual_seed(7)
    answer = client.post("/v1/captions", json={"features": [f.tolist() for f in feats], "model": "tiny", **options})
    assert answer.status_code == 200, answer.text
    torch.manual_seed(7)
    kwargs = {k: v for k, v in options.items() if k != "beam_size"}
    assert answer.json()["captions"] == captioners["tiny"].caption(feats, beam_size=options.get("beam_size", 1),
                                                                   **kwargs)


@pytest.mark.parametrize("options", [{}, {"beam_size": 3, "n_best": 2}], ids=["greedy", "beam"])
def test_every_image_of_a_batch_gets_the_caption_and_score_it_gets_alone(client, captioners, options):
    """Not only up to rounding: equal scores, so that a near-tie between two captions breaks the same way."""
    feats = regions(np.random.default_rng(4), 8)
    body = {"features": [f.tolist() for f in feats], "return_scores": True, **options}
    answer = client.post("/v1/captions", json=body)
    assert answer.status_code == 200, answer.text
    kwargs = {k: v for k, v in options.items() if k != "beam_size"}
    alone = [captioners["tiny"].caption([f], beam_size=options.get("beam_size", 1), return_scores=True, **kwargs)[0]
             for f in feats]
    assert answer.json()["captions"] == alone


def test_form_fields_take_the_decoding_options_as_text(client, captioners, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    form = {"model": "grid", "beam_size": "4", "beam_groups": "2", "diversity_lambda": "0.7", "n_best": "2",
            "block_trigrams": "true", "return_scores": "1"}
    answer = client.post("/v1/captions", files=[("image", ("a.png", image.read_bytes(), "image/png"))], data=form)
    assert answer.status_code == 200, answer.text
    expected = captioners["grid"].caption_images([image], beam_size=4, beam_groups=2, diversity_lambda=0.7, n_best=2,
                                                 block_trigrams=True, return_scores=True)
    assert answer.json()["captions"] == expected
    twice = client.post("/v1/captions", files=[("image", ("a.png", image.read_bytes(), "image/png"))],
                        data={"model": ["grid", "tiny"]})
    assert twice.status_code == 400 and "form field 'model' given twice" in twice.json()["error"], twice.text


def test_the_reference_fixture_gives_its_captions(fixture_k2, reference_fixture):
    expected = json.loads((reference_fixture / "expected.json").read_text())["2"]
    with np.load(reference_fixture / "features.npz") as feats:
        six = [feats[f"att_{i}"].tolist() for i in range(6)]
    with serving({"ref-k2": load(fixture_k2, "ref-k2")}) as client:
        greedy = client.post("/v1/captions", json={"features": six}).json()
        beam = client.post("/v1/captions", json={"features": six, "model": "ref-k2", "beam_size": 3}).json()
    assert greedy["model"] == "ref-k2"
    assert greedy["captions"] == [e["caption"] for e in expected["greedy_batched"]]
    assert beam["captions"] == [e["caption"] for e in expected["beam3_batched"]]


def test_uploaded_images_are_captioned_as_satic_caption_does(client, captioners, tmp_path):
    paths = []
    for i, colour in enumerate([(200, 30, 30), (20, 20, 220)]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(colour=colour))
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in paths]
    answer = client.post("/v1/captions", files=files, data={"model": "grid", "max_length": "6"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["captions"] == captioners["grid"].caption_images(paths, max_length=6)


def features(count=1, regions_=3, dim=DIM) -> list:
    return np.ones((count, regions_, dim)).tolist()


BAD_JSON = [  # (body, status, words the message must contain)
    (b'{"features": [[[1, 2]', 400, "malformed JSON"),
    (b"[" * 20_000 + b"]" * 20_000, 400, "malformed JSON"),  # deeper than any parser's recursion
    (b'{"features": [[[1' + b"0" * 400 + b', 0, 0, 0, 0, 0, 0, 0]]]}', 400, "features[0]: a number is too large"),
    (json.dumps({"features": [features()[0], features(regions_=41)[0]]}).encode(), 413,
     "features[1]: 41 regions, more than this server's limit of 40 per image"),
    (b"[1, 2]", 400, "must be an object"),
    (json.dumps({"features": features(), "beam": 2}).encode(), 400, "unknown field 'beam'"),
    (b'{"model": "tiny"}', 400, "features: missing"),
    (json.dumps({"features": "abc"}).encode(), 400, "features: expected a list"),
    (json.dumps({"features": []}).encode(), 400, "features: the list is empty"),
    (json.dumps({"features": [features()[0], np.ones((2, 5)).tolist()]}).encode(), 400,
     "features[1]: 5 numbers per region, but model 'tiny' reads 8"),
    (json.dumps({"features": [[]]}).encode(), 400, "features[0]: 0 regions"),
    (json.dumps({"features": [[[1.0] * DIM, [1.0] * 3]]}).encode(), 400, "features[0]: expected a (regions x 8)"),
    (json.dumps({"features": [[1.0] * DIM]}).encode(), 400, "features[0]: expected (regions x 8) numbers, got 8"),
    (json.dumps({"features": ["abc"]}).encode(), 400, "features[0]: expected (regions x 8) numbers, got a string"),
    (json.dumps({"features": [{"x": 1}]}).encode(), 400,
     "features[0]: expected (regions x 8) numbers, got a JSON object"),
    # Python's parser reads UTF-16 bytes too, where b"true" is not to be found: true would pass as 1
    ('{"features": [[[1, 2, 3, 4, 5, 6, 7, true]]]}'.encode("utf-16"), 400,
     "malformed JSON: byte 0 of the body is not UTF-8; send the JSON as UTF-8 text"),
    (json.dumps({"features": [[[0.0] * DIM, [float("nan")] * DIM]]}).encode(), 400,
     "features[0]: region 1 contains NaN or Inf"),
    (json.dumps({"features": [[[float("inf")] * DIM]]}).encode(), 400, "features[0]: region 0 contains NaN or Inf"),
    (json.dumps({"features": [features()[0], [[0.5] * DIM, [0.5] * (DIM - 1) + [True]]]}).encode(), 400,
     "features[1]: region 1 holds true or false"),
    (json.dumps({"features": [[[False] + [0.5] * (DIM - 1)]]}).encode(), 400,  # false without any true
     "features[0]: region 0 holds true or false"),
    (json.dumps({"features": [[[0.5] * DIM, [0.5] * (DIM - 1) + ["0.5"]]]}).encode(), 400,  # numpy reads it as 0.5
     "features[0]: region 1 holds the string '0.5'; features must be JSON numbers, without quotes"),
    (json.dumps({"features": [features()[0], [[None] + [0.5] * (DIM - 1)]]}).encode(), 400,
     "features[1]: region 0 holds null; features must be numbers"),
    (json.dumps({"features": [[[0.5] * (DIM - 1) + [{"x": 1}]]]}).encode(), 400,
     "features[0]: region 0 holds a JSON object"),
    (json.dumps({"features": [[[10 ** 39] + [0] * (DIM - 1)]]}).encode(), 400,
     "features[0]: region 0 contains NaN or Inf"),  # an integer beyond float32
    (json.dumps({"features": [features()[0], [[3e38] * DIM]], "return_scores": True}).encode(), 400,
     "features[1]: the model's numbers overflow on these features"),  # finite float32, but no finite score
    (json.dumps({"features": [[[-3e38] * DIM]]}).encode(), 400, "features[0]: the model's numbers overflow"),
    (json.dumps({"features": features(), "beam_size": 14}).encode(), 400,
     "decode options: beam_size 14 makes 14 beams per group, more than the 13 outputs of tiny; use a beam_size "
     "of at most 13"),
    (json.dumps({"features": features(), "beam_size": "3"}).encode(), 400,  # in JSON a number is a number
     "beam_size: expected a whole number >= 1, got '3'"),
    (json.dumps({"features": features(), "temperature": "0.5"}).encode(), 400,
     "temperature: expected a finite number, got '0.5'"),
    (json.dumps({"features": features(), "return_scores": "true"}).encode(), 400,
     "return_scores: expected true or false, got 'true'"),
    (json.dumps({"features": features(), "model": "nope"}).encode(), 404,
     "model: unknown model 'nope'; this server has tiny, grid"),
    (json.dumps({"features": features(), "model": 3}).encode(), 400, "model: expected a model name"),
    (json.dumps({"features": features(), "beam_size": 0}).encode(), 400, "beam_size: expected a whole number"),
    (json.dumps({"features": features(), "beam_size": 99}).encode(), 400, "beam_size: at most 16"),
    (json.dumps({"features": features(), "max_length": 1000}).encode(), 400, "max_length: this model decodes at most"),
    (json.dumps({"features": features(), "max_length": 1}).encode(), 400,
     "max_length: 1 is shorter than one group of K=2"),
    (json.dumps({"features": features(), "temperature": 0}).encode(), 400,
     "decode options: temperature must be positive, got 0.0"),
    (json.dumps({"features": features(), "temperature": "hot"}).encode(), 400,
     "temperature: expected a finite number, got 'hot'"),
    (b'{"features": [[[1, 2, 3, 4, 5, 6, 7, 8]]], "sample_method": "sample", "temperature": 1' + b"0" * 400 + b"}", 400,
     "temperature: expected a finite number, got an integer beyond any float"),
    (b'{"features": [[[1, 2, 3, 4, 5, 6, 7, 8]]], "top_p": -1' + b"0" * 400 + b"}", 400,
     "top_p: expected a finite number, got an integer beyond any float"),
    (json.dumps({"features": features(), "sample_method": "sample", "temperature": 1e-45}).encode(), 400,
     "decode options: temperature must be a finite number of at least 1e-30"),
    (json.dumps({"features": features(), "sample_method": "sample", "top_k": 2**63}).encode(), 400,
     "decode options: top_k must be a whole number >= 0"),
    (json.dumps({"features": features(), "beam_size": 3, "length_penalty": "wu_400", "return_scores": True}).encode(),
     400, "decode options: length_penalty must be '', 'wu_A' or 'avg_A' with |A| <= 50"),
    (json.dumps({"features": features(), "beam_size": 4, "beam_groups": 2, "diversity_lambda": -1e308}).encode(), 400,
     "decode options: diversity_lambda must be a number from -1e+06 to 1e+06"),
    (json.dumps({"features": features(), "sample_method": "nucleus"}).encode(), 400,
     "sample_method: expected 'greedy' or 'sample', got 'nucleus'"),
    (json.dumps({"features": features(), "block_trigrams": "yes"}).encode(), 400,
     "block_trigrams: expected true or false, got 'yes'"),
    (json.dumps({"features": features(), "return_scores": 1}).encode(), 400,
     "return_scores: expected true or false, got 1"),
    (json.dumps({"features": features(), "top_k": -1}).encode(), 400, "top_k: expected a whole number >= 0, got -1"),
    (json.dumps({"features": features(), "length_penalty": "wu"}).encode(), 400,
     "decode options: length_penalty must be '', 'wu_A' or 'avg_A'"),
    (json.dumps({"features": features(), "beam_size": 4, "beam_groups": 3}).encode(), 400,
     "decode options: beam_size (4) must be a multiple of beam_groups (3)"),
    (json.dumps({"features": features(), "beam_size": 3, "sample_method": "sample"}).encode(), 400,
     "decode options: beam search (beam_size > 1) needs sample_method='greedy'"),
    (json.dumps({"features": features(), "sample_n": 17}).encode(), 400, "sample_n: at most 16 on this server"),
    (json.dumps({"features": features(), "n_best": 2}).encode(), 400, "n_best (2) cannot exceed beam_size (1)"),
    (json.dumps({"features": features(count=9)}).encode(), 413, "too many images: 9 in one request, at most 8"),
    (json.dumps({"features": features(count=8, regions_=1000)}).encode(), 413, "larger than this server's limit"),
    (json.dumps({"features": features(), "scene": 0}).encode(), 400, "give either 'features' or 'scene'"),
    (json.dumps({"scene": 99}).encode(), 404, "scene: no scene 99; this server renders scenes 0..5"),
    (json.dumps({"scene": "0"}).encode(), 400, "scene: expected the index of a rendered scene"),
    (b'{"beam_size": 3, "features": ' + json.dumps(features()).encode() + b', "beam_size": 1}', 400,
     "field 'beam_size' given twice; give each field once"),
    # an empty string before the repeated name: the quick scan of the names must pair every quote right
    (b'{"length_penalty": "", "beam_size": 2, "features": ' + json.dumps(features()).encode() + b', "beam_size": 1}',
     400, "field 'beam_size' given twice"),
    (json.dumps({"scene": 6}).encode(), 404, "scene: no scene 6; this server renders scenes 0..5"),
    # the largest float as a JSON integer is a finite number, the decoding options judge it (Python's parser, which
    # keeps it an integer, reads a body with a NaN; the options are checked before the features)
    (json.dumps({"features": [[[float("nan")] * DIM]], "top_p": int(sys.float_info.max)}).encode(), 400,
     "decode options: top_p must be in (0, 1], got 1.7976931348623157e+308"),
    (b'{"model": "tiny", "features": ' + json.dumps(features()).encode() + b', "mod\\u0065l": "grid"}', 400,
     "field 'model' given twice"),
    # orjson reads 1,000 levels; Python's parser (which reads a body with escapes again) does so from 3.12 only
    (b'{"features": ' + b"[" * 1000 + b"]" * 1000 + b', "model": "ti\\u006ey"}', 400,
     "malformed JSON: nested too deeply" if sys.version_info < (3, 12) else "features[0]: expected a (regions x 8)"),
]


@pytest.mark.parametrize("body, status, message", BAD_JSON, ids=[m for _, _, m in BAD_JSON])
def test_bad_json_requests_get_one_clear_error(client, body, status, message):
    answer = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and message in answer.json()["error"], answer.json()


WRONG_KINDS = [  # (body, the whole error): true is not 1, NaN is not a number, a number is not a string
    ({"beam_size": True}, "beam_size: expected a whole number >= 1, got True"),
    ({"temperature": True}, "temperature: expected a finite number, got True"),
    ({"top_p": float("nan")}, "top_p: expected a finite number, got nan"),
    ({"diversity_lambda": float("-inf")}, "diversity_lambda: expected a finite number, got -inf"),
    ({"length_penalty": 3}, "length_penalty: expected a string, got 3"),
    ({"sample_method": 1}, "sample_method: expected 'greedy' or 'sample', got 1"),
]


@pytest.mark.parametrize("fields, said", WRONG_KINDS, ids=[said.split(":")[0] for _, said in WRONG_KINDS])
def test_an_option_of_the_wrong_kind_is_named_by_its_field(client, fields, said):
    body = json.dumps({"features": features(), **fields}).encode()  # Python's json writes NaN and Infinity
    answer = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json() == {"error": said}


@pytest.mark.parametrize("body, said", [
    ({"scene": True}, "scene: expected the index of a rendered scene (0..5), got True"),
    ({"features": [5]}, "features[0]: expected (regions x 8) numbers, got a single number"),
    ({"features": [[["0.1234567890123456789012345"] + [0.5] * (DIM - 1)]]},  # a long string: its first 20 characters
     "features[0]: region 0 holds the string '0.123456789012345678'; features must be JSON numbers, without quotes"),
], ids=["scene-true", "single-number", "long-string"])
def test_features_and_scenes_of_the_wrong_kind_are_named(client, body, said):
    answer = client.post("/v1/captions", json=body)
    assert answer.status_code == 400 and answer.json() == {"error": said}


def test_null_options_take_the_checkpoints_defaults(client, captioners):
    feats = regions(np.random.default_rng(5), 2)
    body = {"features": [f.tolist() for f in feats], "beam_size": None, "temperature": None, "block_trigrams": None,
            "length_penalty": None, "model": None, "return_scores": False}
    answer = client.post("/v1/captions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "tiny" and answer.json()["captions"] == captioners["tiny"].caption(feats)


def test_whole_numbers_among_the_features_are_numbers_even_beside_a_switch(client, captioners):
    """A body with true or false in it has its feature values checked one by one: a region mixing integers and
    floats passes that check."""
    feats = [[1, 0.5, -2, 0.25, 0, 3, 0.75, 1]] * 2
    answer = client.post("/v1/captions", json={"features": [feats], "return_scores": True})
    assert answer.status_code == 200, answer.text
    assert answer.json()["captions"] == captioners["tiny"].caption([np.array(feats, np.float32)], return_scores=True)


def test_the_first_scene_is_captioned(client, captioners):
    from satic.serve.page import render_scenes, scene_regions

    answer = client.post("/v1/captions", json={"scene": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["captions"] == captioners["tiny"].caption([scene_regions(render_scenes(6)[0],
                                                                                  captioners["tiny"])])


def test_form_switches_read_false_and_0(client, captioners, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(colour=(30, 160, 40)))
    answer = client.post("/v1/captions", files=[("image", ("a.png", image.read_bytes(), "image/png"))],
                         data={"model": "grid", "block_trigrams": " False", "return_scores": "0",
                               "remove_bad_endings": "1"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["captions"] == captioners["grid"].caption_images([image], block_trigrams=False,
                                                                          remove_bad_endings=True)
    refused = client.post("/v1/captions", files=[("image", ("a.png", image.read_bytes(), "image/png"))],
                          data={"model": "grid", "block_trigrams": "yes"})
    assert refused.status_code == 400 and refused.json() == {"error": "block_trigrams: expected true or false, got "
                                                                      "'yes'"}


def test_a_server_limited_to_one_beam_serves_the_default_decoding(captioners):
    with serving({"tiny": captioners["tiny"]}, limits={"max_beam_size": 1}) as one:
        assert one.post("/v1/captions", json={"features": features()}).status_code == 200
        refused = one.post("/v1/captions", json={"features": features(), "beam_size": 2})
    assert refused.status_code == 400 and refused.json() == {"error": "beam_size: at most 1 on this server, got 2"}


def test_an_image_past_pillows_decompression_limit_is_refused_before_decoding(monkeypatch):
    """Pillow warns past Image.MAX_IMAGE_PIXELS and refuses past twice that; both are a 413, whatever the server's
    own pixel limit."""
    from satic.serve import Limits
    from satic.serve.inputs import BadRequest, open_upload

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    roomy = Limits(max_image_pixels=10 ** 6)
    for size in ((40, 30), (50, 50)):  # 1200 pixels: a warning; 2500: an error
        with pytest.raises(BadRequest) as refused:
            open_upload(png_bytes(size=size), "image[0] ('big.png')", roomy)
        assert (refused.value.status, refused.value.message) == (
            413, "image[0] ('big.png'): too many pixels to decode safely; send a smaller image")
    assert open_upload(png_bytes(size=(30, 30)), "image[0]", roomy).size == (30, 30)


def test_an_upload_whose_pixel_layout_pillow_skipped_as_damaged_is_a_400(tmp_path):
    """A TIFF whose BitsPerSample entry claims more data than the file holds: Pillow would read it as 1-bit."""
    import struct
    import warnings

    from satic.serve import Limits
    from satic.serve.inputs import BadRequest, open_upload

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8), "L").save(buffer, "TIFF")
    data = buffer.getvalue().replace(struct.pack("<HHI", 258, 3, 1), struct.pack("<HHI", 258, 3, 0x10000))
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            Image.open(io.BytesIO(data)).close()
        named = any("Skipping tag 258" in str(w.message) for w in seen)
    except UnidentifiedImageError:  # an older Pillow refuses the whole file
        named = None
    if named is False:
        pytest.skip("this Pillow does not name the tag it skipped")
    with pytest.raises(BadRequest) as refused:
        open_upload(data, "image[0] ('grey.tif')", Limits())
    assert refused.value.status == 400
    if named:
        assert refused.value.message.startswith("image[0] ('grey.tif'): cannot decode the image (its TIFF tag 258 "
                                                "(BitsPerSample) is damaged (")


@pytest.mark.parametrize("files", [False, True], ids=["json", "form"])
def test_options_in_the_query_string_are_refused_not_ignored(client, files):
    """POST /v1/captions?beam_size=99 would otherwise decode greedily, as if the option had been read."""
    if files:
        answer = client.post("/v1/captions?beam_size=99", files=[("image", ("a.png", png_bytes(), "image/png"))],
                             data={"model": "grid"})
    else:
        answer = client.post("/v1/captions?beam_size=99", json={"features": features()})
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"error": "query parameter 'beam_size': this endpoint reads no query string; give "
                                      "options in the JSON body or as form fields"}


def test_escaped_names_and_quoted_field_names_in_values_are_read_as_json_says(client, captioners):
    """A value may hold a field's name, and a name may be written with escapes: neither is a repeated field."""
    feats = regions(np.random.default_rng(2), 1)
    body = (b'{"be\\u0061m_size": 2, "features": ' + json.dumps([f.tolist() for f in feats]).encode()
            + b', "model": "ti\\u006ey", "length_penalty": ""}')
    answer = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["captions"] == captioners["tiny"].caption(feats, beam_size=2)
    quoted = client.post("/v1/captions", json={"features": [f.tolist() for f in feats], "model": '"model": x'})
    assert quoted.status_code == 404 and "unknown model '\"model\": x'" in quoted.json()["error"], quoted.text


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(client):
    def chunks():
        for _ in range(30):
            yield b" " * 10_000

    answer = client.post("/v1/captions", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "larger than this server's limit" in answer.json()["error"]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(client, chunked):
    """max_body_bytes is the largest body read (200,000 here), by its Content-Length or as it streams in."""
    start = b'{"features": "abc"}'
    for size, status in ((200_000, 400), (200_001, 413)):
        body = start + b" " * (size - len(start))
        content = (body[i:i + 50_000] for i in range(0, size, 50_000)) if chunked else body
        answer = client.post("/v1/captions", content=content, headers={"content-type": "application/json"})
        assert answer.status_code == status, answer.text
        assert ("expected a list" if status == 400 else "larger than this server's limit") in answer.json()["error"]


def test_a_body_without_a_content_type_is_read_as_json(client, captioners):
    feats = regions(np.random.default_rng(3), 2)
    body = json.dumps({"features": [f.tolist() for f in feats]}).encode()
    for headers in ({"content-type": ""}, {}):
        answer = client.post("/v1/captions", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["captions"] == captioners["tiny"].caption(feats)


@pytest.mark.parametrize("content_type, body, message", [
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
     + b"g" * 5000 + b"\r\n--x--\r\n", "A text field (an option) is short: send each image as a file part"),
    ("multipart/form-data", b"--x\r\n", "multipart body: "),  # no boundary given
    ("multipart/form-data; boundary=x", b"not a multipart body", "multipart body: "),  # no boundary in the body
])
def test_a_multipart_body_the_parser_refuses_is_named(client, content_type, body, message):
    answer = client.post("/v1/captions", content=body, headers={"content-type": content_type})
    assert answer.status_code == 400 and answer.json()["error"].startswith("multipart body: ")
    assert message in answer.json()["error"], answer.text


def test_a_service_needs_a_model():
    from satic.serve import ServeSettings, create_app

    with pytest.raises(ValueError, match="^at least one model is needed$"):
        create_app({}, ServeSettings())


def test_an_extraction_nobody_waits_for_reads_no_further_image(captioners):
    """Once its client has gone (`stop` set), an extraction on the worker thread opens no further image: not even
    a broken one, which would be a 400 otherwise."""
    from satic.serve import Limits
    from satic.serve.app import extract

    stop = threading.Event()
    blobs = [("image[0]", png_bytes()), ("image[1]", b"not an image")]
    assert extract(captioners["grid"], blobs[:1], Limits(), stop).shape[0] == 1  # (1, h*w, C)
    assert extract(captioners["grid"], blobs[:1], Limits()).shape[0] == 1  # nothing to stop it
    stop.set()
    assert extract(captioners["grid"], blobs, Limits(), stop) is None


BIG = png_bytes(size=(600, 600))  # 360000 pixels > 250000
BAD_UPLOADS = [  # (files, form fields, status, message)
    ([("image", ("bad.png", b"not a png at all", "image/png"))], {"model": "grid"}, 400,
     "image[0] ('bad.png'): not an image format"),
    ([("image", ("ok.png", png_bytes(), "image/png")), ("image", ("cut.png", png_bytes()[:60], "image/png"))],
     {"model": "grid"}, 400, "image[1] ('cut.png'): cannot decode"),
    ([("image", ("empty.png", b"", "image/png"))], {"model": "grid"}, 400, "image[0] ('empty.png'): the file is empty"),
    ([("image", ("big.png", BIG, "image/png"))], {"model": "grid"}, 413, "600 x 600 pixels is more than"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {}, 400, "model: 'tiny' reads precomputed bottom-up"),
    ([("image", ("a.png", png_bytes(), "image/png"))] * 9, {"model": "grid"}, 413, "too many images"),
    ([("photo", ("a.png", png_bytes(), "image/png"))], {"model": "grid"}, 400, "unknown form field 'photo'"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {"model": "grid", "colour": "red"}, 400,
     "unknown form field 'colour'"),  # a text field too, not only a file
    ([], {"model": "grid", "beam_size": "2"}, 400, "image: no image file"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {"model": "grid", "image": "hello"}, 400,
     "image[0]: sent as a text field; send each image as a file part"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {"model": "grid", "beam_size": "two"}, 400,
     "beam_size: expected a whole number"),
    ([("image", ("a.png", png_bytes(), "image/png"))], {"model": "grid", "max_length": "²"}, 400,
     "max_length: expected a whole number"),  # a digit, but not a decimal one int() reads
]


@pytest.mark.parametrize("files, data, status, message", BAD_UPLOADS, ids=[m for *_, m in BAD_UPLOADS])
def test_bad_uploads_get_one_clear_error(client, files, data, status, message):
    if files:
        answer = client.post("/v1/captions", files=files, data=data)
    else:  # a form without files
        answer = client.post("/v1/captions", data=data, headers={"content-type": "multipart/form-data; boundary=x"},
                             content=b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngrid\r\n--x--\r\n")
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and message in answer.json()["error"], answer.json()


def test_other_mistakes_and_the_server_stays_up(client):
    answer = client.post("/v1/captions", content=b"x", headers={"content-type": "text/plain"})
    assert answer.status_code == 415 and "application/json" in answer.json()["error"]
    assert client.get("/v1/nothing").status_code == 404 and "error" in client.get("/v1/nothing").json()
    assert client.get("/v1/captions").status_code == 405
    for index in ("6", "99", "abc", "-1", "²", "9" * 5000):  # scenes 0..5: 6 is one past the last
        answer = client.get(f"/scenes/{index}.png")
        assert answer.status_code == 404 and answer.json() == {"error": f"no scene '{index}'; this server renders "
                                                                        "scenes 0..5"}
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/captions", json={"features": features()}).status_code == 200


def test_an_unexpected_error_is_a_500_naming_it_and_the_server_stays_up(client, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr("satic.serve.app.check_scores", broken)
    answer = client.post("/v1/captions", json={"features": features()})
    assert answer.status_code == 500 and answer.json() == {"error": "internal error: RuntimeError: boom"}
    monkeypatch.undo()
    assert client.post("/v1/captions", json={"features": features()}).status_code == 200


def test_the_longest_max_length_fills_the_position_table(client, captioners):
    """max_positions 64 holds 32 groups of K=2: 64 words decode, 65 are refused."""
    body = {"features": features(), "model": "tiny", "max_length": 64, "sample_method": "sample", "top_k": 3}
    answer = client.post("/v1/captions", json=body)
    assert answer.status_code == 200, answer.text
    longer = client.post("/v1/captions", json={**body, "max_length": 65})
    assert longer.status_code == 400 and "this model decodes at most 64 words" in longer.json()["error"]


def test_page_and_scenes_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the network
    scene = client.get("/scenes/0.png")
    assert scene.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(scene.content)).size == (160, 160)


def test_a_rendered_scene_is_captioned_by_every_model(client, captioners):
    """Region-feature models read the regions the built-in dataset's generator makes for the scene (the
    same on every request), grid-feature models the scene's image through their extractor."""
    from satic.serve.page import render_scenes, scene_regions

    rendered = render_scenes(6)[2]
    regions_ = scene_regions(rendered, captioners["tiny"])
    assert regions_.shape[1] == DIM and 10 <= regions_.shape[0] <= 100
    assert np.array_equal(regions_, scene_regions(render_scenes(6)[2], captioners["tiny"]))
    tiny = client.post("/v1/captions", json={"scene": 2, "model": "tiny", "max_length": 8})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["captions"] == captioners["tiny"].caption([regions_], max_length=8)
    grid = client.post("/v1/captions", json={"scene": 2, "model": "grid"})
    assert grid.status_code == 200, grid.text
    image = Image.open(io.BytesIO(rendered.png))
    att, _ = captioners["grid"].extractor()([image.convert("RGB")])
    assert grid.json()["captions"] == captioners["grid"].caption(list(att))


def test_every_limit_takes_its_own_value(captioners):
    """'at most N' means N is served, and N + 1 refused: images per request, regions per image, beams and samples,
    pixels of an upload; and the shortest max_length, one group of K=2 words."""
    limits = {"max_images": 3, "max_regions": 5, "max_beam_size": 4, "max_image_pixels": 2500}
    with serving(captioners, limits=limits) as client:
        for body, refused in (({"features": features(count=3, regions_=5), "beam_size": 4},
                               [{"features": features(count=4)}, {"features": features(regions_=6)},
                                {"features": features(), "beam_size": 5}]),
                              ({"features": features(), "sample_method": "sample", "sample_n": 4},
                               [{"features": features(), "sample_method": "sample", "sample_n": 5}]),
                              ({"features": features(), "max_length": 2}, [{"features": features(), "max_length": 1}])):
            answer = client.post("/v1/captions", json=body)
            assert answer.status_code == 200, (body.keys(), answer.text)
            assert all(client.post("/v1/captions", json=bad).status_code in (400, 413) for bad in refused)
        assert len(answer.json()["captions"][0].split()) <= 2
        for size, status in (((50, 50), 200), ((51, 50), 413)):  # 2500 pixels: the limit
            files = [("image", ("limit.png", png_bytes(size=size), "image/png"))]
            answer = client.post("/v1/captions", files=files, data={"model": "grid"})
            assert answer.status_code == status, answer.text


def test_bad_numbers_are_named_by_their_first_region_and_a_negative_scene_is_none(client):
    body = json.dumps({"features": [[[0.0] * DIM, [float("nan")] * DIM, [float("inf")] * DIM]]}).encode()
    answer = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json() == {
        "error": "features[0]: region 1 contains NaN or Inf; features must be finite numbers"}
    answer = client.post("/v1/captions", json={"scene": -1})  # not the last scene, as a Python index would take it
    assert answer.status_code == 404
    assert answer.json() == {"error": "scene: no scene -1; this server renders scenes 0..5"}


def test_a_client_gone_while_its_work_runs_is_counted_as_gone_and_the_work_cancelled():
    """The client leaves while its work (a batch, an extraction) is still running: 499, not a 500 from reading the
    result of work whose cancellation is still unwinding, and the work is cancelled."""
    from satic.serve.app import CLIENT_CLOSED, unless_gone
    from satic.serve.inputs import BadRequest

    class Leaving:
        async def is_disconnected(self) -> bool:
            return False

        async def receive(self) -> dict:
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

    unwound = []

    async def main():
        with pytest.raises(BadRequest) as gone:
            await unless_gone(Leaving(), until_cancelled(unwound, "work"), "its captions were made")
        await asyncio.sleep(0)
        return gone.value

    gone = asyncio.run(asyncio.wait_for(main(), 10))
    assert (gone.status, gone.message) == (CLIENT_CLOSED, "the client closed the connection before its captions "
                                                          "were made")
    assert unwound == ["work"]
