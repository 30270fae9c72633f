"""The official `openai` package against a real candela server (see conftest.py)."""
import base64
import io
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI
from PIL import Image

SMALL = dict(size="64x64", extra_body={"steps": 2})


def decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def http(server, method, path, token=None, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def error_of(payload):
    err = json.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"]
    return err


def test_generate_b64_png_of_requested_size(client):
    r = client.images.generate(model="candela-demo-sd1", prompt="a red fox", response_format="b64_json", **SMALL)
    assert len(r.data) == 1
    img = decode(r.data[0].b64_json)
    assert img.format == "PNG" and img.size == (64, 64)
    assert r.size == "64x64" and r.output_format == "png"


def test_generate_url_is_served_and_expiring_link_is_signed(client, server):
    r = client.images.generate(prompt="a lighthouse", response_format="url", **SMALL)
    url = r.data[0].url
    assert url.startswith(server.url + "/v1/files/images/") and "sig=" in url
    with urllib.request.urlopen(url) as resp:
        img = Image.open(io.BytesIO(resp.read()))
    assert img.size == (64, 64)
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    status, body, _ = http(server, "GET", tampered[len(server.url):])
    assert status == 403 and error_of(body)["code"] == "invalid_signature"
    expired = url.replace("expires=", "expires=1")  # changes the expiry, so the signature no longer matches
    status, _, _ = http(server, "GET", expired[len(server.url):])
    assert status == 403


def test_extensions_via_extra_body_and_seed_reproducibility(client):
    extra = {"steps": 3, "seed": 1234, "sampler": "euler", "negative_prompt": "blurry", "guidance_scale": 5.0, "schedule": "karras"}
    raw = client.images.with_raw_response.generate(prompt="a cat", size="64x64", extra_body=extra)
    assert raw.headers["x-candela-seed"] == "1234"
    first = raw.parse()
    second = client.images.generate(prompt="a cat", size="64x64", extra_body=extra)
    assert base64.b64decode(first.data[0].b64_json) == base64.b64decode(second.data[0].b64_json)
    other = client.images.generate(prompt="a cat", size="64x64", extra_body=dict(extra, seed=4321))
    assert base64.b64decode(other.data[0].b64_json) != base64.b64decode(first.data[0].b64_json)


def test_a1111_sampler_names_are_accepted(client):
    r = client.images.with_raw_response.generate(prompt="a cat", size="64x64", extra_body={"steps": 3, "seed": 9, "sampler": "DPM++ 2M Karras"})
    same = client.images.generate(prompt="a cat", size="64x64", extra_body={"steps": 3, "seed": 9, "sampler": "dpmpp_2m", "schedule": "karras"})
    assert r.parse().data[0].b64_json == same.data[0].b64_json


def test_n2_and_non_square(client):
    r = client.images.generate(prompt="two boats", n=2, size="96x64", extra_body={"steps": 2})
    assert len(r.data) == 2
    for d in r.data:
        assert decode(d.b64_json).size == (96, 64)
    assert r.data[0].b64_json != r.data[1].b64_json


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(client, fmt, pil):
    r = client.images.generate(prompt="a tree", output_format=fmt, output_compression=80 if fmt == "jpeg" else None, size="72x48", extra_body={"steps": 2})
    img = decode(r.data[0].b64_json)
    assert img.format == pil and img.size == (72, 48)
    assert r.output_format == fmt


def test_models_list(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "candela-demo-sd1" in ids
    demo = next(m for m in models.data if m.id == "candela-demo-sd1")
    caps = demo.model_extra["capabilities"]
    assert caps["family"] == "sd1" and caps["default_width"] == 256 and "euler_a" in caps["samplers"]


def test_bad_tokens_are_refused_with_openai_errors(server):
    def attempt(key):
        c = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.images.generate(prompt="x", **SMALL)
        return e.value

    now = int(time.time())
    cases = {
        "garbage": ("not-a-jwt", 401, "invalid_api_key"),
        "expired": (server.hs256({"sub": "alice", "exp": now - 3600, "scope": "images:generate"}), 401, "token_expired"),
        "forged": (server.hs256({"sub": "alice", "exp": now + 3600, "scope": "admin"}, secret=b"x" * 64), 401, "invalid_api_key"),
        "no exp": (server.hs256({"sub": "alice", "scope": "images:generate"}), 401, "invalid_api_key"),
        "wrong scope": (server.token("carol", scope="jobs:read"), 403, "insufficient_scope"),
    }
    for name, (key, status, code) in cases.items():
        err = attempt(key)
        assert err.status_code == status, name
        assert err.body["code"] == code, (name, err.body)
    status, body, headers = http(server, "POST", "/v1/images/generations", body={"prompt": "x"})
    assert status == 401 and error_of(body)["code"] == "missing_api_key"


def test_users_see_only_their_own_jobs_and_images(server, client):
    r = client.images.with_raw_response.generate(prompt="alice's secret garden", **SMALL)
    job_id = r.headers["x-candela-job-id"]
    alice, bob, admin = server.token("alice"), server.token("bob"), server.token("root", scope="admin")
    status, body, _ = http(server, "GET", f"/v1/jobs/{job_id}", alice)
    job = json.loads(body)
    assert status == 200 and job["status"] == "succeeded" and job["user"] == "alice" and job["seed"] is not None
    assert job["params"]["steps"] == 2 and job["params"]["prompt"] == "alice's secret garden"
    for path in [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/images/0"]:
        status, body, _ = http(server, "GET", path, bob)
        assert status == 404 and error_of(body)["code"] == "job_not_found", path
    status, body, _ = http(server, "GET", "/v1/jobs?limit=100", bob)
    assert status == 200 and all(j["user"] == "bob" for j in json.loads(body)["data"])
    status, body, _ = http(server, "GET", f"/v1/jobs/{job_id}/images/0", alice)
    assert status == 200 and Image.open(io.BytesIO(body)).size == (64, 64)
    status, body, _ = http(server, "GET", f"/v1/jobs/{job_id}", admin)
    assert status == 200


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"prompt": "x", "model": "no-such-model"}, 404, "model"),
        ({"prompt": "x", "size": "100x100"}, 400, "size"),
        ({"prompt": "x", "size": "4096x4096"}, 400, "size"),
        ({"prompt": "x", "size": "big"}, 400, "size"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "n": 11}, 400, "n"),
        ({"prompt": "x", "steps": 0}, 400, "steps"),
        ({"prompt": "x", "steps": 1000}, 400, "steps"),
        ({"prompt": "x", "sampler": "heun9"}, 400, "sampler"),
        ({"prompt": "x", "sampler": "euler_a", "schedule": "karras"}, 422, "schedule"),
        ({"prompt": "x", "sampler": "flow_euler"}, 422, "sampler"),
        ({"prompt": "x", "sampler": "DPM++ 2M Karras", "schedule": "exponential"}, 400, "schedule"),
        ({"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale"),
        ({"prompt": "x", "background": "transparent"}, 400, "background"),
        ({"prompt": "x", "response_format": "gif"}, 400, "response_format"),
        ({"prompt": ""}, 400, "prompt"),
    ],
)
def test_bad_inputs_get_4xx_with_param_and_a_failed_job(server, body, status, param):
    token = server.token("dave")
    got, payload, headers = http(server, "POST", "/v1/images/generations", token, body)
    err = error_of(payload)
    assert got == status and err["param"] == param, err
    jobs = json.loads(http(server, "GET", "/v1/jobs?limit=1", token)[1])["data"]
    assert jobs and jobs[0]["status"] == "failed" and jobs[0]["error"], jobs[:1]
    assert jobs[0]["error_code"] == err["code"]


@pytest.mark.parametrize(
    "raw,status,param",
    [
        (b"{not json", 400, "body"),
        (b'{"prompt": "x", "n": "two"}', 400, "n"),
        (b'{"prompt": "x", "frobnicate": 1}', 400, "frobnicate"),
        (b'{"n": 1}', 400, "prompt"),
        (json.dumps({"prompt": "x" * (2 << 20)}).encode(), 413, "body"),
    ],
)
def test_unparseable_requests_get_4xx_with_param(server, raw, status, param):
    got, payload, _ = http(server, "POST", "/v1/images/generations", server.token("erin"), raw=raw)
    err = error_of(payload)
    assert got == status and err["param"] == param, err


def test_health_openapi_and_docs(server):
    status, body, _ = http(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body, _ = http(server, "GET", "/openapi.json")
    spec = json.loads(body)
    assert "/v1/images/generations" in spec["paths"]
    status, body, _ = http(server, "GET", "/docs/")
    assert status == 200 and b"swagger" in body.lower()


def test_swagger_ui_renders_in_headless_chromium(server, tmp_path):
    out = rendered_dom(server.url + "/docs/", tmp_path)
    dom = out.stdout
    # Rendered by Swagger UI's JavaScript from /openapi.json: the operations appear in the DOM.
    assert "opblock" in dom and "/v1/images/generations" in dom, out.stderr[-2000:]


def rendered_dom(url, profile_dir):
    """The page's DOM after headless Chromium has run its scripts."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is required (scripts/test.sh installs it)"
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile_dir}", "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )


def test_dashboard_page_is_served(server):
    status, body, headers = http(server, "GET", "/")
    assert status == 200 and b"/v1/jobs" in body


def test_dashboard_lists_jobs_in_headless_chromium(server, client, tmp_path):
    client.images.generate(prompt="a dashboard check", **SMALL)
    out = rendered_dom(f"{server.url}/#token={client.api_key}", tmp_path)
    dom = out.stdout
    assert "a dashboard check" in dom and "status-succeeded" in dom, out.stderr[-2000:]


def test_dashboard_shows_queue_position_and_cancels(server, client, tmp_path):
    """A queued job shows its place in the queue and a cancel button (which sends the DELETE
    exercised below; --dump-dom cannot click)."""
    admin_token = server.token("root", scope="admin")
    alice = client.api_key

    def call(method, path, token, body=None):
        import urllib.request

        req = urllib.request.Request(server.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read() or b"null")

    call("POST", "/v1/admin/queue/pause", admin_token)
    try:
        job = call("POST", "/v1/images/generations", alice, {"prompt": "waiting in line", "size": "64x64", "async": True})
        out = rendered_dom(f"{server.url}/#token={alice}", tmp_path)
        dom = out.stdout
        assert "waiting in line" in dom and "in queue)" in dom and 'class="cancel"' in dom, out.stderr[-2000:]
        cancelled = call("DELETE", f"/v1/jobs/{job['id']}", alice)
        assert cancelled["status"] == "cancelled"
    finally:
        call("POST", "/v1/admin/queue/resume", admin_token)
