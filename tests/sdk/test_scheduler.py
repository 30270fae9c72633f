"""The job scheduler against a real `candela serve` (each test starts its own server, with the
settings it needs, on an ephemeral loopback port): async mode, server-sent progress events,
cancellation, fairness between users, batching, the memory budget, a full queue, job time
limits, crash recovery after kill -9, and graceful shutdown."""
import base64
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import BIN, ROOT, Server

TINY = ROOT / "tests" / "fixtures" / "models" / "sd1-tiny"
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def start(tmp_path):
    servers = []

    def _start(*args, data_dir=None):
        s = Server(data_dir or tmp_path / f"data{len(servers)}", extra_args=[str(a) for a in args])
        servers.append(s)
        return s

    yield _start
    for s in servers:
        s.stop()


def http(server, user="alice", scope="images:generate jobs:read"):
    return httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.token(user, scope=scope)}"},
        timeout=120,
    )


def submit(c, **body):
    body.setdefault("prompt", "a lighthouse")
    body.setdefault("size", "64x64")
    body.setdefault("steps", 4)
    r = c.post("/v1/images/generations", json=dict(body, **{"async": True}))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["id"].startswith("job_")
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    return job["id"]


def wait(c, job_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} did not finish: {job}")


def events(c, job_id):
    """Every SSE event of a job until its `finished` event, as (name, data) pairs."""
    out = []
    with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[len("data: "):])))
                if name == "finished":
                    break
    return out


def metric(server, name, **labels):
    text = httpx.get(server.url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) == name and (m.group(2) or "").strip("{}") == want:
            return float(m.group(3))
    return 0.0


def pixels(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def test_async_job_streams_progress_in_order(start):
    s = start()
    c = http(s)
    job_id = submit(c, steps=6)
    evs = events(c, job_id)
    names = [n for n, _ in evs]
    assert names[-1] == "finished" and evs[-1][1]["status"] == "succeeded", evs
    steps = [d["step"] for n, d in evs if n == "step"]
    # Subscribing may miss the first steps of a fast job, never reorder or skip later ones.
    assert steps == list(range(steps[0], 7)) if steps else "started" in names, evs
    assert all(d["total"] == 6 and d["eta_seconds"] >= 0 for n, d in evs if n == "step")
    if "started" in names:
        assert names.index("started") < names.index("finished")
    job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["batch_size"] == 1 and len(job["images"]) == 1
    assert "progress" not in job
    # A finished job's stream is just its final event.
    assert events(c, job_id) == [("finished", {"event": "finished", "status": "succeeded", "error_code": None, "error": None})]


def test_full_event_stream_of_a_queued_job(start):
    s = start()
    admin, c = http(s, "root", "admin"), http(s)
    assert admin.post("/v1/admin/queue/pause").status_code == 200
    job_id = submit(c, steps=5)
    job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["progress"]["state"] == "queued" and job["progress"]["queue_position"] == 0
    import threading

    got = []
    t = threading.Thread(target=lambda: got.extend(events(c, job_id)))
    t.start()
    time.sleep(0.3)
    admin.post("/v1/admin/queue/resume")
    t.join(60)
    names = [n for n, _ in got]
    assert names[0] == "queued" and got[0][1]["position"] == 0
    assert names[1] == "started" and got[1][1]["batch_size"] == 1
    assert [d["step"] for n, d in got if n == "step"] == [1, 2, 3, 4, 5]
    assert names[-1] == "finished" and got[-1][1]["status"] == "succeeded"


def test_cancel_queued_and_running_jobs(start):
    s = start()
    admin, c, other = http(s, "root", "admin"), http(s), http(s, "mallory")
    admin.post("/v1/admin/queue/pause")
    queued = submit(c)
    # Someone else's job is invisible, so not cancellable.
    assert other.delete(f"/v1/jobs/{queued}").status_code == 404
    r = c.delete(f"/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert c.delete(f"/v1/jobs/{queued}").status_code == 409
    admin.post("/v1/admin/queue/resume")

    running = submit(c, size="256x256", steps=150)
    deadline = time.time() + 60
    while c.get(f"/v1/jobs/{running}").json().get("progress", {}).get("step", 0) < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    r = c.delete(f"/v1/jobs/{running}")
    assert r.status_code == 200
    job = wait(c, running, timeout=30)
    assert job["status"] == "cancelled" and job["error_code"] == "cancelled" and not job["images"]
    # The engine is free again.
    assert wait(c, submit(c))["status"] == "succeeded"


def test_users_take_turns(start):
    s = start("--max-batch", 1)
    admin, alice, bob = http(s, "root", "admin"), http(s, "alice"), http(s, "bob")
    admin.post("/v1/admin/queue/pause")
    alices = [submit(alice, seed=i) for i in range(4)]
    bobs = submit(bob)
    assert bob.get(f"/v1/jobs/{bobs}").json()["progress"]["queue_position"] == 1
    admin.post("/v1/admin/queue/resume")
    jobs = [wait(alice, j) for j in alices] + [wait(bob, bobs)]
    order = [j["id"] for j in sorted(jobs, key=lambda j: j["started_at"])]
    assert order.index(bobs) == 1, order
    assert all(j["batch_size"] == 1 for j in jobs)


def test_compatible_jobs_are_batched_and_equal_single_runs(start):
    s = start("--max-batch", 4)
    admin, c = http(s, "root", "admin"), http(s)
    batches0, jobs0 = metric(s, "candela_batches_total"), metric(s, "candela_batched_jobs_total")
    admin.post("/v1/admin/queue/pause")
    reqs = [
        dict(prompt="a red barn", seed=1, sampler="euler_a"),
        dict(prompt="a blue lake", seed=2, sampler="euler_a", negative_prompt="fog"),
        dict(prompt="a red barn", seed=3, sampler="euler_a", n=2),
    ]
    batched = [submit(c, **r) for r in reqs]
    odd = submit(c, prompt="other size", seed=4, size="64x48", sampler="euler_a")
    admin.post("/v1/admin/queue/resume")
    done = [wait(c, j) for j in batched]
    assert [j["batch_size"] for j in done] == [3, 3, 3]
    assert wait(c, odd)["batch_size"] == 1
    assert metric(s, "candela_batches_total") - batches0 == 2
    assert metric(s, "candela_batched_jobs_total") - jobs0 == 4
    # Each batched job's images equal the same request run alone (queue empty: no batching).
    for req, job in zip(reqs, done):
        alone = c.post("/v1/images/generations", json=dict(req, size="64x64", steps=4)).json()
        assert len(alone["data"]) == len(job["images"])
        for i, img in enumerate(alone["data"]):
            batched_png = c.get(f"/v1/jobs/{job['id']}/images/{i}").content
            a = pixels(img["b64_json"])
            b = pixels(base64.b64encode(batched_png))
            assert len(a) == len(b)
            worst = max(abs(x - y) for x, y in zip(a, b))
            assert worst <= 1, f"{req}: batched image differs by {worst}/255"


def model_copies(tmp_path, names):
    paths = []
    for n in names:
        dst = tmp_path / "models" / n
        shutil.copytree(TINY, dst)
        paths.append(str(dst))
    return ",".join(paths)


def test_memory_budget_evicts_least_recently_used_and_refuses_too_large_jobs(start, tmp_path):
    models = model_copies(tmp_path, ["alpha", "beta", "gamma"])
    probe = start("--model", models)
    info = {m["id"]: m for m in http(probe).get("/v1/models").json()["data"]}
    probe.stop()
    weights = info["alpha"]["capabilities"]["weights_bytes"]
    working = info["alpha"]["capabilities"]["default_working_bytes"]
    assert weights > 100_000 and working > 0
    # Room for two models and one default-size job, not three models.
    s = start("--model", models, "--memory-budget", 2 * weights + working + weights // 2)
    c = http(s)
    loaded = lambda: {m["id"] for m in c.get("/v1/models").json()["data"] if m["loaded"]}
    assert loaded() == {"alpha", "beta"}  # preloaded in order while they fit
    size = f"{info['alpha']['capabilities']['default_width']}x{info['alpha']['capabilities']['default_height']}"
    gen = lambda m: c.post("/v1/images/generations", json=dict(prompt="x", model=m, size=size, steps=2))
    assert gen("alpha").status_code == 200  # alpha is now the most recently used
    assert gen("gamma").status_code == 200  # needs room: beta (least recently used) goes
    assert loaded() == {"alpha", "gamma"}
    assert metric(s, "candela_model_evictions_total", model="beta") == 1
    assert metric(s, "candela_model_evictions_total", model="alpha") == 0
    assert gen("beta").status_code == 200  # now alpha is the least recently used
    assert loaded() == {"gamma", "beta"}
    assert metric(s, "candela_model_loads_total", model="beta") == 2
    used = metric(s, "candela_memory_used_bytes", device="cpu")
    assert used == 2 * weights and metric(s, "candela_memory_budget_bytes", device="cpu") >= used
    # A job that can never fit is refused at submission, and recorded.
    r = c.post("/v1/images/generations", json=dict(prompt="x", model="alpha", size="1024x1024", steps=2))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "exceeds_memory_budget" and err["param"] == "size"
    job = c.get("/v1/jobs?limit=1").json()["data"][0]
    assert job["status"] == "failed" and job["error_code"] == "exceeds_memory_budget"


def test_cpu_threads_from_the_config_file(start, tmp_path):
    """`threads` in the config file (as `--threads` / CANDELA_THREADS) sizes the CPU's thread pool,
    which the server logs at start."""
    config = tmp_path / "candela.toml"
    config.write_text("threads = 1\n")
    s = start("--config", config, "--model", TINY)
    deadline = time.time() + 10
    while not any("inference on the CPU" in line for line in s.stderr_lines) and time.time() < deadline:
        time.sleep(0.05)
    line = next(line for line in s.stderr_lines if "inference on the CPU" in line)
    assert "threads=1" in line, line
    r = http(s).post("/v1/images/generations", json=dict(prompt="a lighthouse", size="64x64", steps=2))
    assert r.status_code == 200, r.text


def test_full_queue_answers_429_with_retry_after(start):
    s = start("--queue-capacity", 1)
    admin, c = http(s, "root", "admin"), http(s)
    admin.post("/v1/admin/queue/pause")
    first = submit(c)
    r = c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "async": True})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "queue_full"
    admin.post("/v1/admin/queue/resume")
    assert wait(c, first)["status"] == "succeeded"
    failed = [j for j in c.get("/v1/jobs").json()["data"] if j["error_code"] == "queue_full"]
    assert len(failed) == 1 and failed[0]["status"] == "failed"


def test_job_time_limit(start):
    s = start("--job-timeout-secs", 1)
    c = http(s)
    r = c.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "steps": 150})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout"
    job = c.get("/v1/jobs?limit=1").json()["data"][0]
    assert job["status"] == "failed" and job["error_code"] == "timeout"


def rows(data_dir):
    con = sqlite3.connect(data_dir / "candela.db")
    try:
        return {r[0]: r for r in con.execute("SELECT * FROM jobs ORDER BY id")}
    finally:
        con.close()


def wait_running(c, job_id):
    deadline = time.time() + 60
    while c.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.05)


def test_kill_9_mid_job_then_restart_fails_or_requeues_only_that_job(start, tmp_path):
    data = tmp_path / "crash"
    s = start(data_dir=data)
    c = http(s)
    done = [wait(c, submit(c, seed=i)) for i in range(2)]
    assert all(j["status"] == "succeeded" for j in done)
    victim = submit(c, size="256x256", steps=150, seed=7)
    wait_running(c, victim)
    before = rows(data)
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait()

    # Restart with the default policy: the job is failed as interrupted; no other row changed.
    s = start(data_dir=data)
    after = rows(data)
    assert set(after) == set(before)
    for job_id, row in before.items():
        if job_id != victim:
            assert after[job_id] == row
    c = http(s)
    job = c.get(f"/v1/jobs/{victim}").json()
    assert job["status"] == "failed" and job["error_code"] == "interrupted"

    # Same again with --on-restart requeue: the killed job runs again to success.
    victim2 = submit(c, size="128x128", steps=40, seed=8)
    wait_running(c, victim2)
    before = rows(data)
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait()
    s = start("--on-restart", "requeue", data_dir=data)
    c = http(s)
    job = wait(c, victim2)
    assert job["status"] == "succeeded" and job["seed"] == 8 and len(job["images"]) == 1
    after = rows(data)
    for job_id, row in before.items():
        if job_id != victim2:
            assert after[job_id] == row


def test_graceful_shutdown_leaves_nothing_running(start, tmp_path):
    data = tmp_path / "stop"
    s = start("--shutdown-grace-secs", 1, "--max-batch", 1, data_dir=data)
    c = http(s)
    running = submit(c, size="256x256", steps=150)
    queued = submit(c, seed=5)
    wait_running(c, running)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=60) == 0
    statuses = {r[0]: (r[6], r[7]) for r in rows(data).values()}
    assert statuses[queued] == ("failed", "shutting_down"), statuses
    assert statuses[running] in {("failed", "shutting_down"), ("succeeded", None)}, statuses
    assert not [j for j, (st, _) in statuses.items() if st in ("queued", "running")]


def test_sdxl_model_is_served_next_to_sd1(start, tmp_path):
    from openai import OpenAI

    from openai import UnprocessableEntityError

    sdxl = tmp_path / "models" / "sdxl-tiny"
    shutil.copytree(ROOT / "tests" / "fixtures" / "models" / "sdxl-tiny", sdxl)
    inpainting = ROOT / "tests" / "fixtures" / "models" / "sd1-inpaint-tiny"
    s = start("--model", f"{TINY},{sdxl},{inpainting}")
    client = OpenAI(base_url=s.url + "/v1", api_key=s.token("alice"), max_retries=0, timeout=120)
    families = {m.id: m.model_extra["capabilities"]["family"] for m in client.models.list().data}
    assert families == {"sd1-tiny": "sd1", "sdxl-tiny": "sdxl", "sd1-inpaint-tiny": "sd1"}
    # Edits with an OpenAI mask on SDXL (blending) and on an SD 1.x inpainting (9-channel) model.
    pic = png_bytes(64, 48)
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 8, 48, 40))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    for model in ["sdxl-tiny", "sd1-inpaint-tiny"]:
        r = client.images.edit(model=model, image=("in.png", pic, "image/png"),
                               mask=("mask.png", buf.getvalue(), "image/png"), prompt="a castle",
                               extra_body={"steps": 3, "seed": 2})
        assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (64, 48)
    # An inpainting model cannot draw from nothing.
    with pytest.raises(UnprocessableEntityError) as e:
        client.images.generate(model="sd1-inpaint-tiny", prompt="x", size="64x64", extra_body={"steps": 2})
    assert e.value.body["param"] == "mask"
    r = client.images.generate(model="sdxl-tiny", prompt="a castle", size="64x48",
                               extra_body={"steps": 3, "seed": 9, "negative_prompt": "fog"})
    img = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert img.size == (64, 48)
    # No negative prompt: SDXL's zero unconditional embedding (force_zeros_for_empty_prompt).
    r2 = client.images.generate(model="sdxl-tiny", prompt="a castle", size="64x48",
                                extra_body={"steps": 3, "seed": 9})
    assert r2.data[0].b64_json != r.data[0].b64_json


def png_bytes(w, h, color=(200, 40, 90)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks create_variation deprecated
def test_edits_and_variations_through_the_openai_sdk(start, tmp_path):
    from openai import BadRequestError, OpenAI

    s = start()
    client = OpenAI(base_url=s.url + "/v1", api_key=s.token("alice"), max_retries=0, timeout=120)
    pic = png_bytes(72, 40)
    r = client.images.edit(image=("in.png", pic, "image/png"), prompt="a red barn",
                           extra_body={"steps": 4, "seed": 3, "strength": 0.5})
    out = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert out.size == (72, 40)  # the picture's own size
    # The same edit again is the same picture (seeded); another strength is another picture.
    again = client.images.edit(image=("in.png", pic, "image/png"), prompt="a red barn",
                               extra_body={"steps": 4, "seed": 3, "strength": 0.5})
    assert again.data[0].b64_json == r.data[0].b64_json
    other = client.images.edit(image=("in.png", pic, "image/png"), prompt="a red barn",
                               extra_body={"steps": 4, "seed": 3, "strength": 1.0})
    assert other.data[0].b64_json != r.data[0].b64_json
    # An explicit size resizes the upload; n images come back.
    r = client.images.edit(image=("in.png", png_bytes(100, 100), "image/png"), prompt="x", size="64x64", n=2,
                           extra_body={"steps": 3})
    assert len(r.data) == 2 and Image.open(io.BytesIO(base64.b64decode(r.data[1].b64_json))).size == (64, 64)
    v = client.images.create_variation(image=("in.png", pic, "image/png"), n=1, extra_body={"steps": 3, "seed": 1})
    assert Image.open(io.BytesIO(base64.b64decode(v.data[0].b64_json))).size == (72, 40)
    # Jobs record the picture they started from.
    job = http(s).get("/v1/jobs?limit=1").json()["data"][0]
    assert job["params"]["init_image"]["kind"] == "variation" and job["params"]["init_image"]["width"] == 72

    # Bad uploads are 4xx naming the field.
    with pytest.raises(BadRequestError) as e:
        client.images.edit(image=("in.png", b"not a picture", "image/png"), prompt="x")
    assert e.value.body["param"] == "image"
    # OpenAI masks: fully transparent pixels are the area to repaint. With nothing transparent,
    # the prompt cannot change anything; with a transparent hole, it does.
    def rgba_mask(hole):
        m = Image.new("RGBA", (72, 40), (0, 0, 0, 255))
        if hole:
            m.paste((0, 0, 0, 0), (16, 8, 56, 32))
        buf = io.BytesIO()
        m.save(buf, format="PNG")
        return ("mask.png", buf.getvalue(), "image/png")

    def inpaint(prompt, hole):
        r = client.images.edit(image=("in.png", pic, "image/png"), mask=rgba_mask(hole), prompt=prompt,
                               extra_body={"steps": 4, "seed": 5})
        return r.data[0].b64_json

    assert inpaint("a red barn", hole=False) == inpaint("a blue lake", hole=False)
    assert inpaint("a red barn", hole=True) != inpaint("a blue lake", hole=True)
    job = http(s).get("/v1/jobs?limit=1").json()["data"][0]
    assert job["params"]["init_image"]["mask_key"]
    with pytest.raises(BadRequestError) as e:
        client.images.edit(image=("in.png", pic, "image/png"), mask=("m.png", png_bytes(10, 10), "image/png"),
                           prompt="x")
    assert e.value.body["param"] == "mask"
    with pytest.raises(BadRequestError) as e:
        client.images.edit(image=("in.png", pic, "image/png"), prompt="x", extra_body={"strength": 1.5})
    assert e.value.body["param"] == "strength"
    # A decompression bomb: a tiny PNG that claims 100000 x 100000 pixels.
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, format="PNG")
    data = bytearray(bomb.getvalue())
    import struct, zlib
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(BadRequestError) as e:
        client.images.edit(image=("bomb.png", bytes(data), "image/png"), prompt="x")
    assert e.value.body["param"] == "image"


def test_sdxl_base_with_refiner_over_the_api(start, tmp_path):
    from openai import BadRequestError, OpenAI, UnprocessableEntityError

    models = ROOT / "tests" / "fixtures" / "models"
    s = start("--model", f"{models / 'sdxl-tiny'},{models / 'sdxl-refiner-tiny'}")
    client = OpenAI(base_url=s.url + "/v1", api_key=s.token("alice"), max_retries=0, timeout=120)
    families = {m.id: m.model_extra["capabilities"]["family"] for m in client.models.list().data}
    assert families["sdxl-refiner-tiny"] == "sdxl_refiner"
    body = {"steps": 6, "seed": 4}
    plain = client.images.generate(model="sdxl-tiny", prompt="a castle", size="64x64", extra_body=body)
    refined = client.images.generate(model="sdxl-tiny", prompt="a castle", size="64x64",
                                     extra_body=dict(body, refiner="sdxl-refiner-tiny", refiner_switch=0.7))
    assert refined.data[0].b64_json != plain.data[0].b64_json
    assert Image.open(io.BytesIO(base64.b64decode(refined.data[0].b64_json))).size == (64, 64)
    with pytest.raises(BadRequestError) as e:
        client.images.generate(model="sdxl-tiny", prompt="x", extra_body={"refiner": "sdxl-tiny"})
    assert e.value.body["param"] == "refiner"
    # The refiner alone refines pictures; it cannot draw from nothing.
    with pytest.raises(UnprocessableEntityError) as e:
        client.images.generate(model="sdxl-refiner-tiny", prompt="x", size="64x64", extra_body={"steps": 2})
    assert e.value.body["param"] == "image"


def test_quantized_blocks_are_held_once_on_the_cpu_where_twice_would_not_fit(start):
    """q8_0 on the CPU: with AVX-512 VNNI or AVX-VNNI our int8 tiles hold it once; where only
    candle's tiles run (aarch64 dot product) they sit beside the blocks, twice the memory, and the
    server keeps them only when the model so held fits its budget beside a default-size image,
    holding the blocks once otherwise: the model's reported weights say which, the log says why,
    and the model generates."""
    flux = ROOT / "tests" / "fixtures" / "models" / "flux-dev-tiny"

    def capabilities(*args):
        s = start("--model", flux, *args)
        caps = http(s).get("/v1/models").json()["data"][0]["capabilities"]
        return s, caps

    probe, twice = capabilities("--quantize", "q8_0")
    probe.stop()
    probe, once = capabilities("--quantize", "q8_0-compact")
    probe.stop()
    working = twice["default_working_bytes"]
    flags = Path("/proc/cpuinfo").read_text().split()
    ours = all(f in flags for f in ("avx512f", "avx512bw", "avx512_vnni")) or all(
        f in flags for f in ("avx2", "fma", "f16c", "avx_vnni")
    )
    candles = not ours and "asimddp" in flags
    assert (once["weights_bytes"] < twice["weights_bytes"]) == candles, (once, twice)
    budget = twice["weights_bytes"] + working
    # Room for what `q8_0` holds: kept as it is.
    s, caps = capabilities("--quantize", "q8_0", "--memory-budget", budget)
    assert caps["weights_bytes"] == twice["weights_bytes"]
    s.stop()
    # One byte short: candle's tiles give way to the blocks held once; ours are once already.
    s, caps = capabilities("--quantize", "q8_0", "--memory-budget", budget - 1)
    assert caps["weights_bytes"] == once["weights_bytes"]
    logged = lambda: any("quantized blocks held once" in line for line in s.stderr_lines)
    deadline = time.time() + 5
    while candles and not logged() and time.time() < deadline:
        time.sleep(0.05)
    assert logged() == candles
    r = http(s).post("/v1/images/generations", json=dict(prompt="x", size="64x64", steps=2))
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (64, 64)


def test_t5_quantized_on_load_is_counted_and_generates(start):
    """`--quantize-t5 q8_0`: T5's Linear layers held in q8_0 blocks (the tiny FLUX's 32- and
    64-wide rows; its 48-wide ones stay dense, as q8_0's 32-value blocks do not divide them), so
    the model's reported weights shrink by what they were over 8.5 bits a weight, and the model
    generates."""
    flux = ROOT / "tests" / "fixtures" / "models" / "flux-dev-tiny"
    s = start("--model", flux)
    dense = http(s).get("/v1/models").json()["data"][0]["capabilities"]
    s.stop()
    s = start("--model", flux, "--quantize-t5", "q8_0")
    caps = http(s).get("/v1/models").json()["data"][0]["capabilities"]
    assert caps["weights_bytes"] < dense["weights_bytes"], (caps, dense)
    r = http(s).post("/v1/images/generations", json=dict(prompt="x", size="64x64", steps=2))
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (64, 64)


def assert_serve_refuses(config, tmp_path, expected):
    """`candela serve --config config` stops with an error whose message names each of `expected`."""
    out = subprocess.run(
        [BIN, "--data-dir", str(tmp_path / "bad"), "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and all(e in out.stderr for e in expected), out.stderr


def test_models_take_load_options_of_their_own_from_the_config_file(start, tmp_path):
    """`[[model]]` tables in the config file: each model with the load options it names, the
    server-wide ones (flags, or top-level keys of the file) for the rest. Two copies of the tiny
    SD model, one with `quantize = "q8_0"` (its UNet's transformer blocks in q8_0 blocks): it
    reports that format and fewer weight bytes, and both generate; the server-wide `quantize` applies to a table
    that names none, and a table's own `dense` wins over it. A misspelt key or an unknown format
    stops the server with a message naming it."""
    alpha, beta = model_copies(tmp_path, ["alpha", "beta"]).split(",")
    config = tmp_path / "candela.toml"

    def serve(text):
        config.write_text(text)
        s = start("--config", config)
        models = {m["id"]: m["capabilities"] for m in http(s).get("/v1/models").json()["data"]}
        assert all(m["t5_format"] == "dense" for m in models.values()), models
        formats = {name: m["transformer_format"] for name, m in models.items()}
        return s, {name: m["weights_bytes"] for name, m in models.items()}, formats

    s, caps, formats = serve(f'[[model]]\nsource = "{alpha}"\n\n[[model]]\nsource = "{beta}"\nquantize = "q8_0"\n')
    assert formats == {"alpha": "dense", "beta": "q8_0"}, formats
    assert caps["beta"] < caps["alpha"], caps
    for model in ("alpha", "beta"):
        r = http(s).post("/v1/images/generations", json=dict(prompt="x", model=model, size="64x64", steps=2))
        assert r.status_code == 200, r.text
    s.stop()
    s, swapped, formats = serve(
        f'quantize = "q8_0"\n\n[[model]]\nsource = "{alpha}"\n\n[[model]]\nsource = "{beta}"\nquantize = "dense"\n'
    )
    assert formats == {"alpha": "q8_0", "beta": "dense"}, formats
    assert swapped == {"alpha": caps["beta"], "beta": caps["alpha"]}, (swapped, caps)
    s.stop()
    # A misspelt key, and a format that does not exist (named with its model), stop the server.
    for table, expected in [('quantise = "q8_0"', ["quantise"]), ('quantize = "q9"', ["q9", alpha])]:
        config.write_text(f'[[model]]\nsource = "{alpha}"\n{table}\n')
        assert_serve_refuses(config, tmp_path, expected)


def test_a_gguf_transformer_is_served_under_a_name_of_its_own(start, tmp_path):
    """A real `candela serve` with the tiny FLUX.1-dev twice, from one folder: as it is, and with
    its transformer and T5 from GGUF files (`transformer = ...`, `t5 = ...`, under `name = ...`).
    The GGUF model reports their formats (`gguf`) and fewer weight bytes; both generate, and differently (the
    file's blocks moved the weights). Two tables under one id stop the server with a message
    naming it, as does a GGUF file with a format to quantize to."""
    flux = ROOT / "tests" / "fixtures" / "models" / "flux-dev-tiny"
    gguf = ROOT / "tests" / "fixtures" / "models" / "flux1-dev-tiny-mixed.gguf"
    t5 = ROOT / "tests" / "fixtures" / "models" / "t5-flux-tiny-encoder-mixed.gguf"
    config = tmp_path / "candela.toml"
    config.write_text(
        f'[[model]]\nsource = "{flux}"\n\n'
        f'[[model]]\nsource = "{flux}"\ntransformer = "{gguf}"\nt5 = "{t5}"\nname = "flux-gguf"\n'
    )
    s = start("--config", config)
    models = {m["id"]: m["capabilities"] for m in http(s).get("/v1/models").json()["data"]}
    assert set(models) == {"flux-dev-tiny", "flux-gguf"}, models
    assert models["flux-gguf"]["transformer_format"] == "gguf", models["flux-gguf"]
    assert models["flux-gguf"]["t5_format"] == "gguf", models["flux-gguf"]
    assert models["flux-dev-tiny"]["transformer_format"] == "dense"
    assert models["flux-gguf"]["weights_bytes"] < models["flux-dev-tiny"]["weights_bytes"], models
    images = {}
    for model in models:
        r = http(s).post(
            "/v1/images/generations",
            json=dict(prompt="a lighthouse", model=model, size="64x64", steps=2, seed=3, response_format="b64_json"),
        )
        assert r.status_code == 200, r.text
        images[model] = r.json()["data"][0]["b64_json"]
    assert images["flux-gguf"] != images["flux-dev-tiny"]
    s.stop()
    for tables, expected in [
        (f'[[model]]\nsource = "{flux}"\n\n[[model]]\nsource = "{flux}"\ntransformer = "{gguf}"\n', ["flux-dev-tiny", "name"]),
        (f'[[model]]\nsource = "{flux}"\ntransformer = "{gguf}"\nquantize = "q8_0"\n', ["GGUF", "q8_0"]),
    ]:
        config.write_text(tables)
        assert_serve_refuses(config, tmp_path, expected)


def test_a_model_that_does_not_fit_is_served_with_the_flags_that_would(start):
    """A real `candela serve` whose memory budget is one byte short of the tiny FLUX with a
    default-size image: the server starts, warns that the model's jobs at that size will be
    refused and names the least costly flags that make it fit (T5 in q8_0 first); such a request
    is refused with an OpenAI-shaped 422, not run. Served with those flags under the same budget,
    it generates at that size."""
    flux = ROOT / "tests" / "fixtures" / "models" / "flux-dev-tiny"
    s = start("--model", flux)
    caps = http(s).get("/v1/models").json()["data"][0]["capabilities"]
    s.stop()
    budget = caps["weights_bytes"] + caps["default_working_bytes"] - 1
    s = start("--model", flux, "--memory-budget", budget)
    advice = lambda: [line for line in s.stderr_lines if "does not fit the memory budget" in line]
    deadline = time.time() + 5
    while not advice() and time.time() < deadline:
        time.sleep(0.05)
    assert advice() and "load it with --quantize-t5 q8_0 to need" in advice()[0], s.stderr_lines[-5:]
    size = f"{caps['default_width']}x{caps['default_height']}"
    r = http(s).post("/v1/images/generations", json=dict(prompt="x", size=size, steps=2))
    assert r.status_code == 422 and r.json()["error"]["code"] == "exceeds_memory_budget", r.text
    s.stop()
    s = start("--model", flux, "--memory-budget", budget, "--quantize-t5", "q8_0")
    assert not any("does not fit the memory budget" in line for line in s.stderr_lines)
    r = http(s).post("/v1/images/generations", json=dict(prompt="x", size=size, steps=2))
    assert r.status_code == 200, r.status_code
    s.stop()
    # Weights alone over the budget: no size helps, and the error says so, naming the model.
    s = start("--model", flux, "--memory-budget", caps["weights_bytes"] - 1)
    r = http(s).post("/v1/images/generations", json=dict(prompt="x", size="64x64", steps=2))
    error = r.json()["error"]
    assert r.status_code == 422 and error["code"] == "exceeds_memory_budget", r.text
    assert error["param"] == "model" and "at any size" in error["message"], error
