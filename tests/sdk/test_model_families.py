"""Model families beyond SD 1.x/2.x/XL through the real server and the official SDK: the tiny
SD3 (MMDiT) and SD3.5-medium-shaped (MMDiT-X) pipelines, their per-variant defaults in
/v1/models, their extensions, and the errors for what they do not take."""
import base64
import io

import pytest
from PIL import Image, ImageChops

from conftest import ROOT, Server

MODELS = ROOT / "tests" / "fixtures" / "models"
RUNS = ROOT / "tests" / "fixtures" / "runs"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@pytest.fixture(scope="module")
def sd3_server(tmp_path_factory):
    models = ",".join(str(MODELS / m) for m in ["sd3-tiny", "sd35m-tiny", "sd1-tiny"])
    s = Server(tmp_path_factory.mktemp("sd3"), extra_args=["--model", models])
    yield s
    s.stop()


def client_for(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=server.token("alice"), max_retries=0, timeout=120)


def picture(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def worst_diff(a, b):
    """The largest per-channel difference (0-255) between two same-size pictures."""
    assert a.size == b.size
    return max(hi for _, hi in ImageChops.difference(a, b).getextrema())


def test_sd3_models_list_their_variant_defaults(sd3_server):
    caps = {m.id: m.model_extra["capabilities"] for m in client_for(sd3_server).models.list().data}
    assert caps["sd3-tiny"]["family"] == "sd3" and caps["sd3-tiny"]["variant"] == "sd3-medium"
    medium = caps["sd35m-tiny"]
    assert medium["variant"] == "sd3.5-medium"
    assert (medium["default_sampler"], medium["default_steps"], medium["default_guidance_scale"]) == (
        "flow_euler", 40, 4.5)
    assert medium["samplers"] == ["flow_euler"]
    assert medium["size_multiple"] == 16
    assert caps["sd1-tiny"]["default_sampler"] == "euler_a"


def test_sd35_medium_with_skip_layer_guidance_matches_diffusers(sd3_server):
    """The served image equals diffusers' run of the same request (fixture `sd35m_slg`)."""
    client = client_for(sd3_server)
    body = {"seed": 13, "steps": 8, "guidance_scale": 5.0,
            "skip_layer_guidance": {"layers": [1, 2], "scale": 2.8, "start": 0.01, "stop": 0.5}}
    r = client.images.generate(model="sd35m-tiny", prompt=PROMPT, size="64x64", extra_body=body)
    expected = Image.open(RUNS / "sd35m_slg-0.png").convert("RGB")
    assert worst_diff(picture(r.data[0].b64_json), expected) <= 2
    # Without SLG the same seed gives a different picture.
    plain = client.images.generate(model="sd35m-tiny", prompt=PROMPT, size="64x64",
                                   extra_body={"seed": 13, "steps": 8, "guidance_scale": 5.0})
    assert worst_diff(picture(plain.data[0].b64_json), expected) > 2


def test_sd3_t5_length_and_non_square(sd3_server):
    client = client_for(sd3_server)
    r = client.images.generate(model="sd3-tiny", prompt=PROMPT, size="80x48",
                               extra_body={"seed": 12, "steps": 4, "guidance_scale": 3.5,
                                           "negative_prompt": "dull", "max_sequence_length": 16})
    expected = Image.open(RUNS / "sd3_t5_seq_16-0.png").convert("RGB")
    got = picture(r.data[0].b64_json)
    assert got.size == (80, 48)
    assert worst_diff(got, expected) <= 2


def test_sd3_refuses_what_it_does_not_take(sd3_server):
    from openai import BadRequestError, UnprocessableEntityError

    client = client_for(sd3_server)
    with pytest.raises(UnprocessableEntityError) as e:
        client.images.generate(model="sd3-tiny", prompt="x", size="64x64", extra_body={"sampler": "euler_a"})
    assert e.value.body["param"] == "sampler"
    with pytest.raises(BadRequestError) as e:
        client.images.generate(model="sd3-tiny", prompt="x", size="72x64")
    assert e.value.body["param"] == "size"
    with pytest.raises(UnprocessableEntityError) as e:
        client.images.generate(model="sd1-tiny", prompt="x", size="64x64",
                               extra_body={"skip_layer_guidance": {}})
    assert e.value.body["param"] == "skip_layer_guidance"
    with pytest.raises(BadRequestError) as e:
        client.images.generate(model="sd3-tiny", prompt="x", size="64x64",
                               extra_body={"max_sequence_length": 4096, "steps": 2})
    assert e.value.body["param"] == "max_sequence_length"
    with pytest.raises(BadRequestError) as e:
        client.images.generate(model="sd35m-tiny", prompt="x", size="64x64",
                               extra_body={"skip_layer_guidance": {"layers": [9]}, "steps": 2})
    assert e.value.body["param"] == "skip_layer_guidance"


@pytest.fixture(scope="module")
def flux_server(tmp_path_factory):
    models = ",".join(str(MODELS / m) for m in ["flux-dev-tiny", "flux-schnell-tiny"])
    s = Server(tmp_path_factory.mktemp("flux"), extra_args=["--model", models])
    yield s
    s.stop()


def test_flux_dev_and_schnell_match_diffusers(flux_server):
    client = client_for(flux_server)
    caps = {m.id: m.model_extra["capabilities"] for m in client.models.list().data}
    assert (caps["flux-dev-tiny"]["variant"], caps["flux-dev-tiny"]["default_steps"]) == ("flux-dev", 28)
    assert (caps["flux-schnell-tiny"]["variant"], caps["flux-schnell-tiny"]["default_guidance_scale"]) == (
        "flux-schnell", 0.0)
    # True CFG with a negative prompt on dev (fixture `flux_dev_true_cfg`).
    r = client.images.generate(model="flux-dev-tiny", prompt=PROMPT, size="64x48",
                               extra_body={"seed": 44, "steps": 4, "guidance_scale": 3.5, "negative_prompt": "blurry",
                                           "true_cfg_scale": 4.0, "max_sequence_length": 32})
    assert worst_diff(picture(r.data[0].b64_json), Image.open(RUNS / "flux_dev_true_cfg-0.png").convert("RGB")) <= 2
    # schnell with its defaults except the T5 length (fixture `flux_schnell_4steps`).
    r = client.images.generate(model="flux-schnell-tiny", prompt=PROMPT, size="64x64",
                               extra_body={"seed": 45, "max_sequence_length": 32})
    assert worst_diff(picture(r.data[0].b64_json), Image.open(RUNS / "flux_schnell_4steps-0.png").convert("RGB")) <= 2


def test_flux_refuses_what_it_does_not_take(flux_server):
    from openai import UnprocessableEntityError

    client = client_for(flux_server)
    with pytest.raises(UnprocessableEntityError) as e:
        client.images.generate(model="flux-dev-tiny", prompt="x", size="64x64", extra_body={"sampler": "dpmpp_2m"})
    assert e.value.body["param"] == "sampler"
    with pytest.raises(UnprocessableEntityError) as e:
        client.images.generate(model="flux-dev-tiny", prompt="x", size="64x64",
                               extra_body={"skip_layer_guidance": {}, "steps": 2})
    assert e.value.body["param"] == "skip_layer_guidance"


def test_sd3_edit_is_diffusers_image_to_image(sd3_server):
    """/v1/images/edits on SD3 = StableDiffusion3Img2ImgPipeline (fixture `sd3_img2img`)."""
    client = client_for(sd3_server)
    pic = (RUNS / "sd3_img2img-init.png").read_bytes()
    r = client.images.edit(model="sd3-tiny", image=("in.png", pic, "image/png"), prompt=PROMPT,
                           extra_body={"steps": 8, "seed": 31, "strength": 0.6, "guidance_scale": 5.0})
    expected = Image.open(RUNS / "sd3_img2img-0.png").convert("RGB")
    assert worst_diff(picture(r.data[0].b64_json), expected) <= 2
    # SD3 has no inpainting yet: a mask is refused by name.
    from openai import UnprocessableEntityError

    buf = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buf, format="PNG")
    with pytest.raises(UnprocessableEntityError) as e:
        client.images.edit(model="sd3-tiny", image=("in.png", pic, "image/png"),
                           mask=("m.png", buf.getvalue(), "image/png"), prompt="x", extra_body={"steps": 2})
    assert e.value.body["param"] == "mask"


def test_flux_edit_is_diffusers_image_to_image(flux_server):
    """/v1/images/edits on FLUX-dev = FluxImg2ImgPipeline (fixture `flux_dev_img2img`)."""
    client = client_for(flux_server)
    pic = (RUNS / "flux_dev_img2img-init.png").read_bytes()
    r = client.images.edit(model="flux-dev-tiny", image=("in.png", pic, "image/png"), prompt=PROMPT,
                           extra_body={"steps": 6, "seed": 47, "strength": 0.6, "guidance_scale": 3.5,
                                       "max_sequence_length": 32})
    expected = Image.open(RUNS / "flux_dev_img2img-0.png").convert("RGB")
    assert worst_diff(picture(r.data[0].b64_json), expected) <= 2


def test_sd35_edit_takes_skip_layer_guidance_as_a_form_field(sd3_server):
    client = client_for(sd3_server)
    pic = (RUNS / "sd35m_img2img_n2-init.png").read_bytes()
    body = {"steps": 4, "seed": 5, "strength": 0.8}
    plain = client.images.edit(model="sd35m-tiny", image=("in.png", pic, "image/png"), prompt=PROMPT,
                               extra_body=body)
    guided = client.images.edit(model="sd35m-tiny", image=("in.png", pic, "image/png"), prompt=PROMPT,
                                extra_body=dict(body, skip_layer_guidance='{"layers": [1], "start": 0.0, "stop": 1.0}'))
    assert plain.data[0].b64_json != guided.data[0].b64_json
