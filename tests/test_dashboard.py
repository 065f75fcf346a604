"""The analyst dashboard for real: a trained run, Voila serving nbs/dashboards/analysis.ipynb, headless Chromium driving it."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from cyber_moe.dashboard import find_runs, load_run, start, stop, wait_until_serving
from cyber_moe.testing import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Voila's page links fonts on a CDN in <head>; offline, a slow DNS answer stalls the page for minutes:
    # resolve every host but the local one to "not found" at once
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
STDERR = '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]'
PAGE_TIMEOUT_MS = 240_000  # a first Voila render runs the whole notebook: 20-40 s here, more on a loaded machine


@pytest.fixture(scope="module")
def run_outputs(tmp_path_factory, root, cli) -> Path:
    "An outputs folder with one smoke run: trained by `cyber-moe train`, with its config.yaml and the explain stage's SHAP/drift views."
    from cyber_moe.config import load_config, save_config
    from cyber_moe.train import stage_explain

    out = tmp_path_factory.mktemp("dash") / "outputs"
    args = ["--params", str(root / "params" / "smoke.yaml"), "--set", f"outputs_dir={out}"]
    res = subprocess.run([cli, "train", *args, "--quiet"], cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = load_config(root / "params" / "smoke.yaml", [f"outputs_dir={out}"])
    if not (cfg.run_dir / "config.yaml").is_file():
        save_config(cfg, cfg.run_dir / "config.yaml")  # `cyber-moe pipeline` writes it
    stage_explain(cfg, n=8, n_background=5)
    return out


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    "Start Voila on the dashboard for an outputs folder (free port on 127.0.0.1); every server is stopped at the end."
    procs = []

    def _serve(outputs_dir: Path) -> str:
        port = free_port()
        log = open(tmp_path_factory.mktemp("voila") / "voila.log", "w")
        proc = start(outputs_dir=outputs_dir, port=port, stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, timeout=120, proc=proc)
        return url

    yield _serve
    for proc, log in procs:
        stop(proc, timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: the dashboard test drives a real Chromium; install it with "
            "`apt-get install -y chromium` (`make pytest` does it when missing)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, url: str, ready: str, *, width: int = 1366):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(
        url, wait_until="commit", timeout=PAGE_TIMEOUT_MS
    )  # the page streams as the notebook runs; some CDN assets never load offline
    page.wait_for_selector(ready, timeout=PAGE_TIMEOUT_MS)
    return page


def _close(page) -> None:
    page.close(run_before_unload=True)  # lets Voila shut the page's kernel down


def _assert_clean(page) -> None:
    body = page.inner_text("body")
    assert "Traceback" not in body and "There was an error when executing cell" not in body, body[-2000:]
    assert page.locator(STDERR).count() == 0, page.locator(STDERR).first.inner_text()
    errors = page.locator(".cm-error")
    assert errors.count() == 0, errors.first.inner_text()


def _verdict(page) -> str:
    return page.locator(".cm-verdict").first.inner_text()


def _wait_verdict(page, condition: str, arg=None) -> None:
    "Wait until the verdict's text `t` satisfies the JavaScript expression `condition` (`a` is `arg`)."
    page.wait_for_function(
        f"a => {{ const v = document.querySelector('.cm-verdict'); if (!v) return false; const t = v.innerText; return {condition}; }}",
        arg=arg,
        timeout=60_000,
    )


def test_dashboard_page(run_outputs, serve, browser, root):
    metrics = json.loads((run_outputs / "smoke" / "metrics.json").read_text())
    page = _open(browser, serve(run_outputs), ".cm-verdict")
    try:
        # every figure: PR/ROC, 2 confusion matrices, per-class F1, gate, reliability, SHAP, drift, flow scores, flow SHAP
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 10", timeout=120_000)
        _assert_clean(page)
        body = page.inner_text("body")
        assert "smoke (outputs) · cyber-moe-synth v1" in body  # the run folder, tagged with its registered version
        for who in ("model", "baseline"):
            assert f"{metrics[who]['binary']['f1']:.4f}" in body and f"{metrics[who]['family']['macro_f1']:.4f}" in body
        assert "operating point" in page.locator(".js-plotly-plot").nth(0).inner_text()
        widths = page.eval_on_selector_all(".js-plotly-plot", "els => els.map(e => e.getBoundingClientRect().width)")
        assert widths[0] > 1.6 * widths[1], widths  # the two-panel PR / ROC figure spans the page, the others share rows
        assert "from the run's explain stage" in body and "explain/drift.json" in body
        assert all(h > 100 for h in page.eval_on_selector_all(".js-plotly-plot", "els => els.map(e => e.getBoundingClientRect().height)"))

        # another flow: the verdict follows
        first = _verdict(page)
        assert first.startswith("Flow #0 of the test split")
        page.select_option(".cm-flow select", index=5)
        _wait_verdict(page, "!t.startsWith(a)", "Flow #0 ")
        assert _verdict(page) != first and " of the test split" in _verdict(page)

        # filters: only flows the model got wrong, then only one true family
        page.locator(".cm-outcome button", has_text="wrong").click()
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.cm-flow option')).every(o => o.textContent.endsWith('✗'))", timeout=60_000
        )
        _wait_verdict(page, "t.includes('family wrong')")
        n_wrong = page.locator(".cm-flow option").count()
        assert n_wrong == metrics["run"]["test_rows"] - round(metrics["model"]["family"]["accuracy"] * metrics["run"]["test_rows"])
        page.select_option(".cm-family select", label="dos")
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.cm-flow option'))"  # ipywidgets writes spaces as U+00A0
            ".every(o => o.textContent.replace(/\\u00a0/g, ' ').includes('true dos → '))",
            timeout=60_000,
        )
        assert page.locator(".cm-flow option").count() <= n_wrong

        # an uploaded CSV (rows of the run's data file): its flows replace the test split's
        data = sorted((run_outputs / "data").glob("*.parquet"))
        rows = pd.read_parquet([p for p in data if "truth" not in p.name][0]).head(6)
        csv = run_outputs.parent / "upload.csv"
        rows.to_csv(csv, index=False)
        with page.expect_file_chooser() as chooser:
            page.locator(".cm-upload").click()
        chooser.value.set_files(str(csv))
        _wait_verdict(page, "t.includes('upload.csv')")
        assert page.locator(".cm-flow option").count() == 6
        _assert_clean(page)

        # an uploaded capture: the first 1,500 packets of the run's generated pcap, metered by NFStream in the kernel
        import dpkt
        from cyber_moe.nfstream import pcap_to_flows

        small = run_outputs.parent / "upload.pcap"
        with open(sorted((run_outputs / "data").glob("*.pcap"))[0], "rb") as f, open(small, "wb") as g:
            reader = dpkt.pcap.Reader(f)
            writer = dpkt.pcap.Writer(g, linktype=reader.datalink())
            for _, (ts, buf) in zip(range(1500), reader):
                writer.writepkt(buf, ts)
        n_flows = len(pcap_to_flows(small))
        assert 0 < n_flows < 500
        with page.expect_file_chooser() as chooser:
            page.locator(".cm-upload").click()
        chooser.value.set_files(str(small))
        _wait_verdict(page, "t.includes('upload.pcap')")
        assert page.locator(".cm-flow option").count() == n_flows
        _assert_clean(page)

        # screenshot of the whole page (the scrolling happens inside Voila's panel: grow the viewport to it)
        height = page.evaluate("Math.max(...Array.from(document.querySelectorAll('div')).map(d => d.scrollHeight))")
        page.set_viewport_size({"width": 1366, "height": int(height) + 40})
        time.sleep(2)  # plotly relayouts after the resize
        (root / "outputs").mkdir(exist_ok=True)
        page.screenshot(path=str(root / "outputs" / "dashboard.png"))
    finally:
        _close(page)


def test_dashboard_without_runs(serve, browser, tmp_path):
    page = _open(browser, serve(tmp_path / "empty-outputs"), ".cm-nodata")
    try:
        text = page.locator(".cm-nodata").inner_text()
        assert "No run found" in text and "cyber-moe train" in text
        assert page.locator(".js-plotly-plot").count() == 0
        assert page.locator(STDERR).count() == 0
    finally:
        _close(page)


def test_registry_only_run(run_outputs, tmp_path):
    "A registered model whose run folder is gone is still listed and shown from MLflow's artefacts."
    only_db = tmp_path / "outputs"
    only_db.mkdir()
    shutil.copy(run_outputs / "mlflow.db", only_db / "mlflow.db")  # the registry still points at the artefact store
    refs = find_runs(only_db)
    assert [(r.run_dir, r.registered) for r in refs] == [(None, ["cyber-moe-synth v1"])]
    assert refs[0].label.startswith("smoke (cyber-moe-synth v1)")
    view = load_run(refs[0], outputs_dir=only_db)
    assert view.metrics == json.loads((run_outputs / "smoke" / "metrics.json").read_text())
    assert view.bundle.classes == view.metrics["run"]["classes"]
    assert view.test is None and view.importance is not None and view.drift is not None
    assert any("registered model without its run folder" in n for n in view.notes)


def test_run_picker_switches_runs(run_outputs, serve, browser, tmp_path):
    "Two run folders: the picker lists both and choosing the other rebuilds the page for it (figures, verdict, no error)."
    out = tmp_path / "outputs"
    shutil.copytree(run_outputs, out)
    shutil.copytree(out / "smoke", out / "smoke-b")
    (out / "smoke-b" / "metrics.json").touch()  # the newest run is listed first
    page = _open(browser, serve(out), ".cm-verdict")
    try:
        options = [o.replace("\xa0", " ") for o in page.locator(".cm-run select option").all_inner_texts()]  # ipywidgets writes U+00A0
        assert len(options) == 2 and options[0].startswith("smoke-b") and options[1].startswith("smoke "), options
        notes = [t.replace("\xa0", " ") for t in page.locator(".cm-note").all_inner_texts()]
        assert any(t.startswith("smoke-b (outputs)") for t in notes), notes
        # record, as the page changes, what is on screen once the chosen run's headline table shows
        page.evaluate("""() => { window.cmLog = []; const note = k => { if (!window.cmLog.includes(k)) window.cmLog.push(k); };
            new MutationObserver(() => {
                const h = document.querySelector('.cm-headline');
                if (!h || h.dataset.run !== 'smoke') return;
                note('headline');
                if (document.querySelector('.cm-pending')) note('pending');
                else if (window.cmLog.includes('pending') && document.querySelector('.cm-verdict')) note('filled');
            }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true}); }""")
        page.select_option(".cm-run select", index=1)
        page.wait_for_function("() => window.cmLog.includes('filled')", timeout=120_000)
        # the headline table came first, with the heavy views still marked "computing ...", and they were filled in place later
        assert page.evaluate("window.cmLog") == ["headline", "pending", "filled"], page.evaluate("window.cmLog")
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.cm-note'))"
            ".some(n => n.innerText.replace(/\u00a0/g, ' ').startsWith('smoke (outputs)'))",
            timeout=120_000,
        )
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 10", timeout=120_000)
        _wait_verdict(page, "t.startsWith('Flow #0 of the test split')")
        _assert_clean(page)
    finally:
        _close(page)


def test_triage_marks_and_suppresses(run_outputs, serve, browser, tmp_path):
    "An analyst opens the most uncertain alert, marks it a false positive (benign, with a note) and suppresses its source and port: both are in the store."
    from cyber_moe.feedback import FeedbackStore

    out = tmp_path / "outputs"
    shutil.copytree(run_outputs, out)
    classes = json.loads((out / "smoke" / "metrics.json").read_text())["run"]["classes"]
    flows = pd.read_parquet([p for p in sorted((out / "data").glob("*.parquet")) if "truth" not in p.name][0]).head(3)
    recs = [
        {
            "id": f"a{i}",
            "src_ip": f"198.18.0.{i + 1}",
            "src_port": 40000 + i,
            "dst_ip": "198.18.1.1",
            "dst_port": 80,
            "protocol": 6,
            "p_attack": p,
            "family": classes[1],
            "features": flows.iloc[i].to_dict(),
        }
        for i, p in enumerate([0.97, 0.62, 0.99])
    ]
    url = f"sqlite:///{out / 'feedback.db'}"
    with FeedbackStore(url) as store:
        store.add_alerts(recs, model_name="cyber-moe-synth", model_version="1", source="test", classes=classes, threshold=0.5)
    page = _open(browser, serve(out), ".cm-queue select")
    try:
        page.wait_for_function("document.querySelectorAll('.cm-queue option').length === 3", timeout=60_000)
        assert "alerts 1–3 of 3" in page.locator(".cm-page-info").inner_text().replace("\xa0", " ")  # one page: no older alerts
        assert page.locator(".cm-page-next").is_disabled() and page.locator(".cm-page-prev").is_disabled()
        page.locator(".cm-order button", has_text="most uncertain").click()
        page.wait_for_function("document.querySelector('.cm-queue option').textContent.includes('198.18.0.2')", timeout=60_000)
        page.select_option(".cm-queue select", index=0)
        page.wait_for_selector('.cm-alert[data-id="a1"]', timeout=60_000)
        page.locator(".cm-verdict-choice button", has_text="false positive").click()
        page.wait_for_function(
            "document.querySelector('.cm-right-family select').value.length > 0 && "
            "document.querySelector('.cm-right-family select').selectedOptions[0].textContent === 'benign'",
            timeout=60_000,
        )
        page.fill(".cm-verdict-note input", "monitoring poller")
        page.locator(".cm-mark").click()
        page.wait_for_selector(".cm-marked", timeout=60_000)
        page.fill(".cm-rule-reason input", "poller host")
        page.locator(".cm-rule-create").click()
        page.wait_for_selector(".cm-rule-made", timeout=60_000)
        assert "poller host" in page.locator(".cm-rules").inner_text()
        _assert_clean(page)
    finally:
        _close(page)
    with FeedbackStore(url) as store:
        assert [(v["verdict"], v["label"], v["note"]) for v in store.verdicts("a1")] == [("fp", "benign", "monitoring poller")]
        rule = store.list_rules()[-1]
        assert (rule.src.split("/")[0], rule.dst_port, rule.family, rule.reason) == ("198.18.0.2", 80, None, "poller host")
        assert rule.active()
