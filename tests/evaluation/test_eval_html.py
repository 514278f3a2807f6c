"""The prediction page, opened in a real headless browser."""
import os
from pathlib import Path

import numpy as np
from PIL import Image

from satic.evaluation.html import PageItem, image_url, render_item, write_html_page

EVIL = 'a <b>dog</b> & "cat" <script>document.title="pwned"</script>'


def make_page(tmp_path: Path) -> Path:
    images = tmp_path / "images" / "val 2014"  # a space: the URL must be encoded
    images.mkdir(parents=True)
    Image.new("RGB", (64, 48), (255, 0, 0)).save(images / "red.png")
    Image.new("RGB", (64, 48), (0, 0, 255)).save(images / "blue.png")
    items = [
        PageItem(1, {"prediction": "a red square on a page"}, images / "red.png", ["a red box", "red"],
                 {"CIDEr": 1.25}),
        PageItem(2, {"K=2 <i>": EVIL}, images / "blue.png"),
        PageItem("no-image", {"prediction": "a caption without an image"}),
    ]
    return write_html_page(tmp_path / "pages" / "index.html", items, title="test page")


def test_page_text_is_escaped_and_links_relative(tmp_path):
    page = make_page(tmp_path)
    text = page.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "K=2 &lt;i&gt;" in text
    assert 'src="../images/val%202014/red.png"' in text
    assert "CIDEr 1.250" in text
    assert image_url(tmp_path / "a" / "b.jpg", tmp_path / "c") == "../a/b.jpg"


def test_an_item_is_a_figure_of_its_image_captions_references_scores_and_id(tmp_path):
    item = PageItem(7, {"teacher": "a dog", "K=2": "a cat"}, tmp_path / "img" / "7.jpg", ["a dog runs", "dogs"],
                    {"CIDEr": 1.5, "BLEU-4": 0.25})
    assert render_item(item, tmp_path / "page") == (
        '<figure data-image-id="7"><img src="../img/7.jpg" alt="image 7" loading="lazy"><figcaption>'
        '<div class="caption" data-who="teacher"><span class="who">teacher</span><span class="text">a dog</span></div>'
        '<div class="caption" data-who="K=2"><span class="who">K=2</span><span class="text">a cat</span></div>'
        '<div class="who">references</div><ol class="references"><li>a dog runs</li><li>dogs</li></ol>'
        '<div class="scores">CIDEr 1.500, BLEU-4 0.250</div>'
        '<div class="image-id">image 7</div></figcaption></figure>')
    assert render_item(PageItem("x", {"prediction": "red"}), tmp_path, lazy=False) == (
        '<figure data-image-id="x"><figcaption><div class="caption" data-who="prediction"><span class="who">'
        'prediction</span><span class="text">red</span></div><div class="image-id">image x</div></figcaption></figure>')


def test_a_page_written_to_a_path_given_as_text_has_the_default_title_notes_and_lazy_images(tmp_path):
    """The evaluation's page of a whole split loads each image as it scrolls into view; the demo's asks for all."""
    items = [PageItem(i, {"prediction": "red"}, tmp_path / f"{i}.png") for i in range(2)]
    page = write_html_page(str(tmp_path / "index.html"), items, notes=["seen <by eye>"])
    assert page == tmp_path / "index.html"
    text = page.read_text(encoding="utf-8")
    assert "<title>satic predictions</title>" in text and "<h1>satic predictions</h1>" in text
    assert "<p>seen &lt;by eye&gt;</p><p>2 images</p>" in text
    assert text.count('loading="lazy"') == 2
    assert 'loading="lazy"' not in write_html_page(tmp_path / "all.html", items, lazy=False).read_text()


def test_an_image_in_a_folder_named_in_another_encoding_is_linked_by_its_bytes(tmp_path):
    folder = tmp_path / os.fsdecode(b"caf\xe9")  # Latin-1 "café", as Python decodes a name that is not UTF-8
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "red.png")
    page = write_html_page(tmp_path / "index.html", [PageItem(1, {"prediction": "red"}, folder / "red.png")])
    assert 'src="caf%E9/red.png"' in page.read_text()


def test_page_renders_in_headless_chromium(tmp_path, chromium):
    page = make_page(tmp_path)
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "a red square on a page" in dom.stdout and "a caption without an image" in dom.stdout
    assert "<title>test page</title>" in dom.stdout  # the injected script did not run
    assert "a &lt;b&gt;dog&lt;/b&gt; &amp; \"cat\"" in dom.stdout
    shot = tmp_path / "shot.png"
    done = chromium(f"--screenshot={shot}", "--window-size=900,700", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    red = np.all(pixels == (255, 0, 0), axis=1).sum()
    blue = np.all(pixels == (0, 0, 255), axis=1).sum()
    assert red > 1000 and blue > 1000  # both images loaded through their relative links
