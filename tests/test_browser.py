"""The explorer's pages end to end in headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium): index → SAE → latent → live text, steering and "which latents fire".
Saves screenshots under artifacts/ (CI keeps them)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from saescope.explore.server import create_app

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
# tests/need-browser (run by `make test`) installs these where they are missing.
CHROMIUM = os.environ.get("SAESCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SAESCOPE_CHROMEDRIVER", "/usr/bin/chromedriver")


def _serve(app):
    """The app on a free loopback port in a thread: its URL while the fixture lives."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def server(tiny_lm, feature_db, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 1, 2])
    fig.savefig(tmp_path / "pareto.png")
    plt.close(fig)
    yield from _serve(create_app(feature_db[3], lm=tiny_lm, run_dir=tmp_path))


@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run tests/need-browser (`make test` does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1600", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_explorer_pages_in_chromium(server, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))  # pages re-render

    def ready(fragment: str) -> None:
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == fragment)

    def find(css: str):
        return browser.find_elements(By.CSS_SELECTOR, css)

    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(server + "/")
    ready("")
    assert [a.text for a in find("a.sae-link")] == ["attn.0", "resid.1"]
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector('.plots img'); return i && i.complete && i.naturalWidth > 0"))
    assert "tiny" in find("#model")[0].text

    find("a.sae-link")[1].click()
    ready("#/sae/resid.1")
    assert len(find("#latents tr.latent-row")) == 24 and "24 latents" in find("#latent-count")[0].text
    densities = [r.find_elements(By.TAG_NAME, "td")[1].text for r in find("#latents tr.latent-row")]
    assert float(densities[0].rstrip("%")) >= float(densities[-1].rstrip("%"))  # sorted by density, densest first
    find("th[data-sort=latent]")[0].click()  # sortable: by latent number, descending
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#latents tr.latent-row td").text == "23")
    search = find("#latent-search")[0]
    search.send_keys("7\n")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#latent-count").text.startswith("1 latent")
               or d.find_element(By.CSS_SELECTOR, "#latents tr.latent-row td").text == "7")

    find("#fire-run")[0].click()  # which latents fire on this text
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#fire-top a"))
    assert find("#fire-out .tok")

    browser.get(server + "/#/sae/resid.1?sort=density&order=desc")
    ready("#/sae/resid.1?sort=density&order=desc")
    latent = find("#latents tr.latent-row a")[0]
    number = latent.text
    latent.click()
    ready(f"#/sae/resid.1/latent/{number}")
    examples = find("#top-examples .example")
    assert examples, "the densest latent shows top examples"
    highlighted = find("#top-examples .tok.hl")
    assert len(highlighted) == len(examples)
    shade = highlighted[0].value_of_css_property("background-color")
    assert shade.startswith("rgba(255, 140, 0") and float(highlighted[0].get_attribute("data-act")) > 0
    assert float(highlighted[0].get_attribute("title").split()[-1]) > 0  # value on hover
    assert len(find("#histogram div")) == 32 and find("#neighbours a")
    browser.save_screenshot(str(ARTIFACTS / "explorer-latent.png"))

    find("#test-run")[0].click()  # test your text: the first top example's own text
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#test-out .tok"))
    assert any(float(t.get_attribute("data-act")) > 0 for t in find("#test-out .tok"))
    steer_alpha = find("#steer-alpha")[0]
    steer_alpha.clear()
    steer_alpha.send_keys("80")
    find("#steer-run")[0].click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#steer-steered"))
    assert find("#steer-plain")[0].text != find("#steer-steered")[0].text
    browser.save_screenshot(str(ARTIFACTS / "explorer-live.png"))

    browser.get(server + "/#/sae/nope")
    ready("#/sae/nope")
    assert "unknown SAE 'nope'" in find("#view .error")[0].text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/api/saes/nope" not in e["message"]]
    assert not errors, errors


@pytest.fixture
def graph_server(tiny_lm, doc_folder, tmp_path):
    """The explorer over a feature database of a tiny transcoder set, with that set to make graphs."""
    import numpy as np
    import torch
    from conftest import tiny_transcoders

    from saescope import CorpusConfig, save_sae
    from saescope.data import token_rows
    from saescope.explore import build

    name = "mlp_in.0-2-jumprelu-tc-24"
    saes = {}
    for sae in tiny_transcoders(tiny_lm):
        saes[f"{sae.cfg.site}-jumprelu-tc-24"] = (sae, save_sae(sae, tmp_path / "saes" / f"{sae.cfg.site}-jumprelu-tc-24"))
    rows = torch.from_numpy(np.stack(list(token_rows(tiny_lm, CorpusConfig(source=str(doc_folder), seq_len=32, split="all")))[:8]))
    build(saes, tiny_lm, rows, tmp_path / "features.db", batch_size=4, top_k=3, sample=8, bands=2, per_band=1, progress=False)
    yield from _serve(create_app(tmp_path / "features.db", lm=tiny_lm, transcoders=[s for s, _ in saes.values()],
                                 transcoders_name=name))


def test_graph_pages_in_chromium(graph_server, browser):
    """A new prompt makes a graph; it draws; a pinned feature's node opens its feature page; an
    intervention on it changes the shown logits."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))

    def find(css: str):
        return browser.find_elements(By.CSS_SELECTOR, css)

    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(graph_server + "/#/graphs")
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "#/graphs")
    assert not find("a.graph-link")
    find("#graph-prompt")[0].send_keys("The quick brown fox jumps")
    find("#graph-make")[0].click()
    wait.until(lambda d: (d.execute_script("return document.body.dataset.ready") or "").startswith("#/graph/"))
    nodes = find("#graph .node.cross-layer-transcoder")
    assert nodes and find("#graph .edge") and len(find("#graph .axis")) >= 5
    assert find("#graph .logit") and find("#graph .embedding")
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('mouseenter'))", nodes[0])
    tip = find("#graph-tip")[0].text
    assert "act" in tip and " · " in tip  # activation and the feature's top tokens
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click'))", nodes[0])
    pin = find("#pins .pin")
    assert len(pin) == 1 and "pinned" in nodes[0].get_attribute("class")
    browser.save_screenshot(str(ARTIFACTS / "explorer-graph.png"))

    value = find("#pins .pin-value")[0]
    value.clear()
    value.send_keys("50")
    find("#intervene-run")[0].click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#logits-intervened tr"))
    clean = [r.text for r in find("#logits-clean tr")]
    changed = [r.text for r in find("#logits-intervened tr")]
    assert len(clean) > 1 and clean != changed
    browser.save_screenshot(str(ARTIFACTS / "explorer-intervention.png"))

    link = find("#pins .feature-link")[0]
    node_id = find("#pins .pin")[0].get_attribute("data-node")
    layer, latent, _ = node_id.split("_")
    link.click()
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready")
               == f"#/sae/mlp_in.{layer}-jumprelu-tc-24/latent/{latent}")
    assert f"latent {latent}" in find("h1")[0].text

    browser.get(graph_server + "/#/graphs")
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "#/graphs")
    assert len(find("a.graph-link")) == 1
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
