//! `POST /v1/images/generations`: OpenAI's Images API plus candela's extensions.
//!
//! Field decisions (documented in the OpenAPI schema too):
//! - honoured: `prompt`, `model`, `n`, `size`, `response_format`, `output_format`,
//!   `output_compression` (JPEG quality; WebP is always lossless), `user` (recorded on the job);
//! - accepted and recorded, no effect on the picture: `quality`, `style`, `moderation`,
//!   `background` = `auto`/`opaque`;
//! - rejected: `background` = `transparent` (diffusion models here produce opaque RGB).

use std::io::Cursor;

use actix_web::{post, web, HttpRequest, HttpResponse};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{parse_json, read_body, request_id, ApiError, AppState, Caller};
use crate::auth::SCOPE_GENERATE;
use crate::db::{now_ms, JobImage, NewJob};
use crate::engine::{
    pipelines::params::{
        GenerateParams, InitImage, RefinerSpec, SkipLayerGuidance, TransformerOptions,
    },
    schedulers::{SamplerKind, SamplerOptions, SigmaSchedule},
    GeneratedImage,
};
use crate::jobs::{JobEvent, JobRequest, ModelInfo, Ticket};

const MAX_PROMPT_CHARS: usize = 32_000;

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageGenerationRequest {
    /// What to draw.
    pub prompt: String,
    /// Model id from `GET /v1/models`; the server's default model when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Number of images, 1 to 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// `"WIDTHxHEIGHT"` (multiples of 8) or `"auto"` (the model's native size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// `b64_json` (default) or `url` (a signed, expiring link served by this server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<String>,
    /// `png` (default), `jpeg` or `webp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_format: Option<String>,
    /// 0-100: JPEG quality (default 100). WebP output is lossless and ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_compression: Option<u8>,
    /// Accepted and recorded (`auto`, `standard`, `hd`, `low`, `medium`, `high`); no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    /// `auto` or `opaque`; `transparent` is rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<String>,
    /// Accepted and recorded (`vivid`, `natural`); no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
    /// Accepted and recorded (`auto`, `low`); no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moderation: Option<String>,
    /// An end-user id, recorded on the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Extension: the sampler (default: the model's `default_sampler`, `euler_a` for SD 1.x/2.x/XL,
    /// `flow_euler` for SD3): any name in the model's `samplers` or
    /// `sampler_aliases` from `GET /v1/models`, e.g. `dpmpp_2m`, `unipc`, `"DPM++ 2M Karras"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    /// Extension: noise-level spacing: `default` (the model's), `karras`, `exponential`, `beta`
    /// or `sgm_uniform`, where the sampler offers it (else 422).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Extension: order of the multistep samplers (`dpmpp_2m`, `dpmpp_2m_sde`, `unipc`), 1 to 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<u32>,
    /// Extension: denoising steps, 1 to 150 (default: the model's `default_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Extension: seed; the same seed gives the same image as diffusers on CPU noise. Random when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Extension: what to steer away from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Extension: classifier-free guidance scale, 0 to 30 (default: the model's
    /// `default_guidance_scale`; ≤ 1 disables guidance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    /// Extension: width in pixels (overrides `size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Extension: height in pixels (overrides `size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Extension: skip this many final CLIP layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<u32>,
    /// Extension (SDXL): a refiner model id (family `sdxl_refiner`) that takes over for the end
    /// of the schedule ("ensemble of experts").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refiner: Option<String>,
    /// Extension: the fraction of the schedule the base denoises before the refiner (default 0.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refiner_switch: Option<f64>,
    /// Extension (edits and variations): how much to change the uploaded picture, 0 < strength
    /// ≤ 1 (default 0.8 for edits, 0.6 for variations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Extension: answer `202` with the queued job at once instead of waiting for the images
    /// (same as the header `Prefer: respond-async`).
    #[serde(rename = "async", default, skip_serializing_if = "Option::is_none")]
    pub run_async: Option<bool>,
    /// Extension (FLUX): true classifier-free guidance with `negative_prompt` above 1 (two model
    /// runs per step). FLUX-dev's `guidance_scale` is the distilled guidance the model takes as
    /// an input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_cfg_scale: Option<f64>,
    /// Extension (SD3, FLUX): T5 prompt tokens, 1 to 512 (default 256; 512 for FLUX-dev).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<u32>,
    /// Extension (SD3.5): Skip Layer Guidance. Fields left out take Stability's recommendation
    /// for SD3.5 Medium (layers 7, 8, 9; scale 2.8; start 0.01; stop 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_layer_guidance: Option<SkipLayerGuidanceRequest>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkipLayerGuidanceRequest {
    /// Transformer blocks to leave out of the guidance pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Fraction of the steps where it starts (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<f64>,
    /// Fraction of the steps where it stops (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revised_prompt: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: i64,
    pub data: Vec<ImageData>,
    pub output_format: String,
    pub size: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background: Option<String>,
    /// candela extension: the job that recorded this request.
    pub job_id: String,
    /// candela extension: the seed used.
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    fn ext(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }
}

/// A request checked against the model; everything the engine and encoder need.
#[derive(Clone)]
struct Validated {
    params: GenerateParams,
    format: ImageFormat,
    as_url: bool,
    jpeg_quality: u8,
}

fn one_of(param: &str, value: &Option<String>, allowed: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be one of {}, got `{v}`", allowed.join(", ")),
        )),
        _ => Ok(()),
    }
}

/// `"WIDTHxHEIGHT"`.
pub(super) fn parse_size(size: &str) -> Option<(usize, usize)> {
    let (w, h) = size.split_once('x')?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

fn validate(
    req: &ImageGenerationRequest,
    model: &ModelInfo,
    limits: &super::Limits,
    init: Option<&InitPicture>,
) -> Result<Validated, ApiError> {
    match (init, req.strength) {
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "strength",
                "`strength` applies to /v1/images/edits and /v1/images/variations",
            ))
        }
        (Some(_), Some(s)) if !(s > 0.0 && s <= 1.0) => {
            return Err(ApiError::invalid(
                "strength",
                format!("`strength` must be in (0, 1], got {s}"),
            ))
        }
        _ => {}
    }
    // A variation has no prompt; everything else needs one.
    if init.is_none_or(|i| !i.prompt_optional) && req.prompt.trim().is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    if req.prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::invalid(
            "prompt",
            format!("`prompt` is longer than {MAX_PROMPT_CHARS} characters"),
        ));
    }
    if req
        .negative_prompt
        .as_ref()
        .is_some_and(|p| p.chars().count() > MAX_PROMPT_CHARS)
    {
        return Err(ApiError::invalid(
            "negative_prompt",
            format!("`negative_prompt` is longer than {MAX_PROMPT_CHARS} characters"),
        ));
    }
    let n = req.n.unwrap_or(1) as usize;
    if n == 0 || n > limits.max_n {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be between 1 and {}, got {n}", limits.max_n),
        ));
    }
    let (mut width, mut height) = match req.size.as_deref() {
        None | Some("auto") => (model.default_width, model.default_height),
        Some(s) => parse_size(s).ok_or_else(|| {
            ApiError::invalid(
                "size",
                format!("`size` must be \"WIDTHxHEIGHT\" or \"auto\", got `{s}`"),
            )
        })?,
    };
    if let Some(w) = req.width {
        width = w as usize;
    }
    if let Some(h) = req.height {
        height = h as usize;
    }
    let m = model.size_multiple;
    let size_param = if req.width.is_some() || req.height.is_some() {
        if req.width.is_some() {
            "width"
        } else {
            "height"
        }
    } else {
        "size"
    };
    for side in [width, height] {
        if side < m || side % m != 0 || side > limits.max_side {
            return Err(ApiError::invalid(
                size_param,
                format!(
                    "{width}x{height}: each side must be a multiple of {m} between {m} and {}",
                    limits.max_side
                ),
            ));
        }
    }
    let steps = req.steps.map_or(model.default_steps, |s| s as usize);
    if steps == 0 || steps > limits.max_steps {
        return Err(ApiError::invalid(
            "steps",
            format!(
                "`steps` must be between 1 and {}, got {steps}",
                limits.max_steps
            ),
        ));
    }
    let guidance = req.guidance_scale.unwrap_or(model.default_guidance_scale);
    if !guidance.is_finite() || !(0.0..=30.0).contains(&guidance) {
        return Err(ApiError::invalid(
            "guidance_scale",
            "`guidance_scale` must be between 0 and 30",
        ));
    }
    let (sampler, named_schedule) =
        SamplerKind::parse_with_schedule(req.sampler.as_deref().unwrap_or(&model.default_sampler))
            .map_err(|e| ApiError::from(e).with_param("sampler"))?;
    let schedule = match (req.schedule.as_deref(), named_schedule) {
        (Some(s), named) => {
            let s: SigmaSchedule = s.parse().map_err(|_| {
                ApiError::invalid(
                    "schedule",
                    format!(
                        "unknown schedule `{s}`; available: {}",
                        model.schedules.join(", ")
                    ),
                )
            })?;
            if named.is_some_and(|n| n != s) {
                return Err(ApiError::invalid(
                    "schedule",
                    "`schedule` contradicts the schedule in the sampler name",
                ));
            }
            s
        }
        (None, named) => named.unwrap_or_default(),
    };
    if !model.samplers.iter().any(|s| s == sampler.name()) {
        return Err(crate::engine::EngineError::Incompatible {
            param: "sampler",
            message: format!(
                "model `{}` does not support sampler `{}`; available: {}",
                model.id,
                sampler.name(),
                model.samplers.join(", ")
            ),
        }
        .into());
    }
    sampler.check_schedule(schedule)?;
    let solver_order = req.solver_order.map(|o| o as usize);
    if let Some(order) = solver_order {
        SamplerOptions {
            solver_order: Some(order),
            ..Default::default()
        }
        .check(sampler)?;
    }
    let clip_skip = req.clip_skip.unwrap_or(0) as usize;
    if clip_skip > 10 {
        return Err(ApiError::invalid(
            "clip_skip",
            "`clip_skip` must be between 0 and 10",
        ));
    }
    one_of(
        "response_format",
        &req.response_format,
        &["b64_json", "url"],
    )?;
    one_of(
        "output_format",
        &req.output_format,
        &["png", "jpeg", "webp"],
    )?;
    one_of(
        "quality",
        &req.quality,
        &["auto", "standard", "hd", "low", "medium", "high"],
    )?;
    one_of("style", &req.style, &["vivid", "natural"])?;
    one_of("moderation", &req.moderation, &["auto", "low"])?;
    one_of(
        "background",
        &req.background,
        &["auto", "opaque", "transparent"],
    )?;
    if req.background.as_deref() == Some("transparent") {
        return Err(ApiError::invalid(
            "background",
            "transparent backgrounds are not supported; use `auto` or `opaque`",
        ));
    }
    if req.output_compression.is_some_and(|c| c > 100) {
        return Err(ApiError::invalid(
            "output_compression",
            "`output_compression` must be between 0 and 100",
        ));
    }
    let format = match req.output_format.as_deref() {
        Some("jpeg") => ImageFormat::Jpeg,
        Some("webp") => ImageFormat::Webp,
        _ => ImageFormat::Png,
    };
    let refiner = match (&req.refiner, req.refiner_switch) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "refiner_switch",
                "`refiner_switch` needs `refiner`",
            ))
        }
        (Some(id), switch) => {
            let switch = switch.unwrap_or(0.8);
            if !(switch > 0.0 && switch < 1.0) {
                return Err(ApiError::invalid(
                    "refiner_switch",
                    format!("`refiner_switch` must be between 0 and 1, got {switch}"),
                ));
            }
            if model.family != "sdxl" || init.is_some() {
                return Err(crate::engine::EngineError::Incompatible {
                    param: "refiner",
                    message: "a refiner follows SDXL base text-to-image".into(),
                }
                .into());
            }
            Some(RefinerSpec {
                model: id.clone(),
                switch,
            })
        }
    };
    let seed = req
        .seed
        .unwrap_or_else(|| rand::random::<u64>() & ((1u64 << 53) - 1));
    let init = match init {
        Some(pic) => {
            if (pic.width as usize, pic.height as usize) != (width, height) {
                return Err(ApiError::internal("the uploaded picture was not resized"));
            }
            Some(InitImage {
                rgb: pic.rgb.clone(),
                mask: pic.mask.clone(),
                strength: req.strength.unwrap_or(pic.default_strength),
            })
        }
        None => None,
    };
    let transformer = transformer_options(req, model)?;
    Ok(Validated {
        params: GenerateParams {
            transformer,
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            width,
            height,
            steps,
            guidance_scale: guidance,
            seed,
            sampler,
            schedule,
            solver_order,
            n,
            clip_skip,
            init,
            refiner,
            stage: None,
        },
        format,
        as_url: req.response_format.as_deref() == Some("url"),
        jpeg_quality: req.output_compression.unwrap_or(100).max(1),
    })
}

/// The diffusion-transformer extensions, refused for models that do not read them.
fn transformer_options(
    req: &ImageGenerationRequest,
    model: &ModelInfo,
) -> Result<TransformerOptions, ApiError> {
    let is_sd3 = model.family == "sd3";
    let is_flux = model.family == "flux";
    if !is_flux && req.true_cfg_scale.is_some() {
        return Err(crate::engine::EngineError::Incompatible {
            param: "true_cfg_scale",
            message: format!(
                "`true_cfg_scale` is for FLUX models; `{}` takes guidance_scale",
                model.id
            ),
        }
        .into());
    }
    if !(is_sd3 || is_flux) && req.max_sequence_length.is_some() {
        return Err(crate::engine::EngineError::Incompatible {
            param: "max_sequence_length",
            message: format!("model `{}` has no T5 text encoder", model.id),
        }
        .into());
    }
    let skip_layer_guidance = match &req.skip_layer_guidance {
        None => None,
        Some(_) if !is_sd3 => {
            return Err(crate::engine::EngineError::Incompatible {
                param: "skip_layer_guidance",
                message: format!("Skip Layer Guidance is for SD3 models, not `{}`", model.id),
            }
            .into())
        }
        Some(r) => {
            let base = SkipLayerGuidance::sd35_medium();
            Some(SkipLayerGuidance {
                layers: r
                    .layers
                    .as_ref()
                    .map_or(base.layers, |l| l.iter().map(|&x| x as usize).collect()),
                scale: r.scale.unwrap_or(base.scale),
                start: r.start.unwrap_or(base.start),
                stop: r.stop.unwrap_or(base.stop),
            })
        }
    };
    Ok(TransformerOptions {
        true_cfg_scale: req.true_cfg_scale,
        max_sequence_length: req.max_sequence_length.map(|n| n as usize),
        skip_layer_guidance,
    })
}

fn encode(
    img: &GeneratedImage,
    format: ImageFormat,
    jpeg_quality: u8,
) -> Result<Vec<u8>, ApiError> {
    let buffer = image::RgbImage::from_raw(img.width, img.height, img.rgb.clone())
        .ok_or_else(|| ApiError::internal("image buffer has the wrong size"))?;
    let mut out = Cursor::new(Vec::new());
    let result = match format {
        ImageFormat::Png => buffer.write_to(&mut out, image::ImageFormat::Png),
        ImageFormat::Webp => buffer.write_to(&mut out, image::ImageFormat::WebP),
        ImageFormat::Jpeg => {
            let encoder =
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, jpeg_quality);
            buffer.write_with_encoder(encoder)
        }
    };
    result.map_err(|e| ApiError::internal(format!("image encoding failed: {e}")))?;
    Ok(out.into_inner())
}

/// Create images from a prompt (OpenAI Images API). Every call is recorded as a job. By default
/// the call waits for the images; with `"async": true` (or `Prefer: respond-async`) it answers
/// `202` with the queued job at once, to follow at `/v1/jobs/{id}` or `/v1/jobs/{id}/events`.
#[utoipa::path(post, path = "/v1/images/generations", tag = "images", security(("bearer" = [])),
    request_body = ImageGenerationRequest,
    params(("Prefer" = Option<String>, Header, description = "`respond-async` answers 202 with the queued job")),
    responses(
        (status = 200, body = ImagesResponse, headers(("x-candela-seed" = u64), ("x-candela-job-id" = String))),
        (status = 202, body = super::jobs::JobView, description = "queued (async mode)"),
        (status = 400, body = super::error::ErrorResponse, description = "invalid field; `param` names it"),
        (status = 401, body = super::error::ErrorResponse), (status = 403, body = super::error::ErrorResponse),
        (status = 404, body = super::error::ErrorResponse, description = "unknown model"),
        (status = 409, body = super::error::ErrorResponse, description = "cancelled while waiting"),
        (status = 413, body = super::error::ErrorResponse),
        (status = 422, body = super::error::ErrorResponse, description = "unsupported combination, or larger than the device's memory budget"),
        (status = 429, body = super::error::ErrorResponse, description = "queue full; see Retry-After"),
        (status = 500, body = super::error::ErrorResponse), (status = 503, body = super::error::ErrorResponse),
        (status = 504, body = super::error::ErrorResponse, description = "the job exceeded its time limit")))]
#[post("/v1/images/generations")]
pub async fn generate(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_GENERATE)?;
    let body = read_body(payload, state.limits.max_body_bytes).await?;
    let req: ImageGenerationRequest = parse_json(&body)?;
    run_request(&state, &caller, &http, req, None).await
}

/// Record a parsed request as a job, queue it, and answer: with the images, or at once with the
/// queued job in async mode. Shared by generations, edits and variations.
pub async fn run_request(
    state: &web::Data<AppState>,
    caller: &Caller,
    http: &HttpRequest,
    req: ImageGenerationRequest,
    init: Option<InitPicture>,
) -> Result<HttpResponse, ApiError> {
    let run_async = req.run_async.unwrap_or(false)
        || http
            .headers()
            .get("Prefer")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("respond-async"));

    // From here on the request is a job: every outcome is recorded on its row.
    let job_id = format!("job_{}", uuid::Uuid::new_v4().simple());
    let model_name = req
        .model
        .clone()
        .or_else(|| state.engine.default_model().map(|m| m.id.clone()))
        .unwrap_or_default();
    let mut params_json = serde_json::to_value(&req).unwrap_or(serde_json::Value::Null);
    if let (Some(pic), Some(fields)) = (&init, params_json.as_object_mut()) {
        fields.insert(super::edits::INIT_IMAGE_FIELD.into(), pic.record());
    }
    let priority = caller.0.is_admin();
    state
        .db
        .insert_job(NewJob {
            id: &job_id,
            user: &caller.0.user,
            model: &model_name,
            prompt: &req.prompt,
            params: &params_json,
            request_id: request_id(http).as_deref(),
            priority,
        })
        .await?;

    let runner = match submit(
        state,
        &req,
        init.as_ref(),
        &model_name,
        &job_id,
        &caller.0.user,
        priority,
    ) {
        Ok(runner) => runner,
        Err(e) => {
            record_failure(state, &job_id, &e).await;
            return Err(e);
        }
    };
    if run_async {
        let job = state
            .db
            .get_job(&job_id, None)
            .await?
            .ok_or_else(|| ApiError::internal("the job row vanished"))?;
        return Ok(HttpResponse::Accepted()
            .insert_header(("Location", format!("/v1/jobs/{job_id}")))
            .insert_header(("x-candela-job-id", job_id.clone()))
            .json(super::jobs::JobView::new(
                job,
                state.engine.progress(&job_id),
            )));
    }
    let done = runner
        .await
        .map_err(|e| ApiError::internal(format!("the job runner stopped: {e}")))??;
    respond(state, &req, &job_id, done)
}

async fn record_failure(state: &AppState, job_id: &str, e: &ApiError) {
    if let Err(db) = state
        .db
        .mark_failed(job_id, e.code(), &e.body.message)
        .await
    {
        tracing::error!(job = %job_id, error = %db, "could not record the failure");
    }
    tracing::warn!(job = %job_id, code = e.code(), error = %e.body.message, "job failed");
}

/// An uploaded starting picture (edits, variations), already at the output size.
#[derive(Clone)]
pub struct InitPicture {
    pub rgb: std::sync::Arc<Vec<u8>>,
    /// Inpainting mask at the same size (≥ 128 = repaint), from an edit's `mask`.
    pub mask: Option<std::sync::Arc<Vec<u8>>>,
    pub mask_key: Option<String>,
    pub width: u32,
    pub height: u32,
    /// Where the job row says it is kept (so a re-queued job finds it again).
    pub store_key: String,
    pub default_strength: f64,
    pub prompt_optional: bool,
}

/// What a finished job hands back to a waiting request.
pub struct Completed {
    images: Vec<(Vec<u8>, String)>,
    format: ImageFormat,
    as_url: bool,
    width: usize,
    height: usize,
    seed: u64,
}

/// Validate and queue; the returned task records the outcome on the job row whether or not
/// anyone waits for it (the client may disconnect, or have asked for async mode).
pub fn submit(
    state: &web::Data<AppState>,
    req: &ImageGenerationRequest,
    init: Option<&InitPicture>,
    model_name: &str,
    job_id: &str,
    user: &str,
    priority: bool,
) -> Result<tokio::task::JoinHandle<Result<Completed, ApiError>>, ApiError> {
    let model = state.engine.model(model_name).ok_or_else(|| {
        let available: Vec<&str> = state
            .engine
            .models()
            .iter()
            .map(|m| m.id.as_str())
            .collect();
        ApiError::not_found(
            "model_not_found",
            format!(
                "model `{model_name}` does not exist; available: {}",
                available.join(", ")
            ),
        )
        .with_param("model")
    })?;
    let v = validate(req, model, &state.limits, init)?;
    if let Some(r) = &v.params.refiner {
        match state.engine.model(&r.model) {
            Some(m) if m.family == "sdxl_refiner" => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    "refiner",
                    format!("model `{}` is not an SDXL refiner", r.model),
                ))
            }
            None => {
                return Err(ApiError::not_found(
                    "model_not_found",
                    format!("refiner model `{}` does not exist", r.model),
                )
                .with_param("refiner"))
            }
        }
    }
    let ticket = state.engine.submit(JobRequest {
        id: job_id.to_string(),
        user: user.to_string(),
        priority,
        model: model_name.to_string(),
        params: v.params.clone(),
    })?;
    let runtime = state.runtime.clone();
    let state = state.clone();
    let job_id = job_id.to_string();
    Ok(runtime.spawn(async move {
        let result = complete(&state, &job_id, ticket, v).await;
        match &result {
            Ok(_) => state.engine.finish(&job_id, "succeeded", None, None),
            Err(e) => {
                let status = if e.code() == "cancelled" {
                    "cancelled"
                } else {
                    "failed"
                };
                state
                    .engine
                    .finish(&job_id, status, Some(e.code()), Some(&e.body.message));
            }
        }
        result
    }))
}

/// Follow a queued job to its end and record the outcome (images stored, row updated).
async fn complete(
    state: &AppState,
    job_id: &str,
    mut ticket: Ticket,
    v: Validated,
) -> Result<Completed, ApiError> {
    let seed = v.params.seed;
    let outcome = loop {
        tokio::select! {
            event = ticket.events.recv() => {
                if let Ok(JobEvent::Started { batch_size }) = event {
                    state.db.mark_running(job_id, seed, batch_size).await?;
                }
            }
            outcome = &mut ticket.outcome => break outcome,
        }
    };
    let outcome = outcome.map_err(|_| ApiError::from(crate::jobs::SubmitError::EngineGone));
    let out = match outcome.and_then(|o| o.map_err(ApiError::from)) {
        Ok(out) => out,
        Err(e) => {
            if e.code() == "cancelled" {
                state.db.mark_cancelled(job_id).await?;
                tracing::info!(job = %job_id, "job cancelled");
            } else {
                record_failure(state, job_id, &e).await;
            }
            return Err(e);
        }
    };
    tracing::info!(job = %job_id, seconds = format!("{:.2}", out.seconds), batch = out.batch_size, "generated");
    let mut images = Vec::with_capacity(out.images.len());
    let mut records = Vec::with_capacity(out.images.len());
    let stored: Result<(), ApiError> = (|| {
        for (i, img) in out.images.iter().enumerate() {
            let bytes = encode(img, v.format, v.jpeg_quality)?;
            let key = state.store.put(&bytes, v.format.ext())?;
            records.push(JobImage {
                index: i as i64,
                image_key: key.clone(),
                format: v.format.ext().to_string(),
                width: img.width as i64,
                height: img.height as i64,
                bytes: bytes.len() as i64,
            });
            images.push((bytes, key));
        }
        Ok(())
    })();
    if let Err(e) = stored {
        record_failure(state, job_id, &e).await;
        return Err(e);
    }
    state.db.mark_succeeded(job_id, &records).await?;
    Ok(Completed {
        images,
        format: v.format,
        as_url: v.as_url,
        width: v.params.width,
        height: v.params.height,
        seed,
    })
}

fn respond(
    state: &AppState,
    req: &ImageGenerationRequest,
    job_id: &str,
    done: Completed,
) -> Result<HttpResponse, ApiError> {
    let expires = (now_ms() / 1000) as u64 + state.limits.url_ttl_secs;
    let data = done
        .images
        .iter()
        .map(|(bytes, key)| {
            if done.as_url {
                ImageData {
                    b64_json: None,
                    url: Some(format!(
                        "{}{}",
                        state.public_url,
                        state.links.path(key, expires)
                    )),
                    revised_prompt: None,
                }
            } else {
                ImageData {
                    b64_json: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                    url: None,
                    revised_prompt: None,
                }
            }
        })
        .collect();
    Ok(HttpResponse::Ok()
        .insert_header(("x-candela-seed", done.seed.to_string()))
        .insert_header(("x-candela-job-id", job_id.to_string()))
        .json(ImagesResponse {
            created: now_ms() / 1000,
            data,
            output_format: done.format.ext().to_string(),
            size: format!("{}x{}", done.width, done.height),
            quality: req.quality.clone(),
            background: req.background.clone(),
            job_id: job_id.to_string(),
            seed: done.seed,
        }))
}
