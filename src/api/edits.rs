//! `POST /v1/images/edits` and `POST /v1/images/variations` (OpenAI's multipart forms):
//! image-to-image from an uploaded picture. Uploads are decoded with size limits (no
//! decompression bombs), resized to a valid size, kept in the image store (so a re-queued job
//! finds its picture again), and bad files get a 4xx naming the field.

use std::io::Cursor;
use std::sync::Arc;

use actix_multipart::Multipart;
use actix_web::{post, web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::{Map, Value};

use super::images::{run_request, ImageGenerationRequest, InitPicture};
use super::{parse_json, ApiError, AppState, Caller};
use crate::auth::SCOPE_GENERATE;

/// Where a job row records its uploaded picture (store key and size).
pub const INIT_IMAGE_FIELD: &str = "init_image";
/// The largest picture side accepted before resizing, and the decoder's allocation cap.
const MAX_UPLOAD_SIDE: u32 = 8192;
const MAX_DECODE_BYTES: u64 = 512 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Edit,
    Variation,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Edit => "edit",
            Self::Variation => "variation",
        }
    }

    /// diffusers' img2img default (0.8) for edits; variations keep more of the picture.
    fn default_strength(self) -> f64 {
        match self {
            Self::Edit => 0.8,
            Self::Variation => 0.6,
        }
    }
}

impl InitPicture {
    /// What the job row keeps about the picture.
    pub fn record(&self) -> Value {
        serde_json::json!({
            "key": self.store_key,
            "mask_key": self.mask_key,
            "width": self.width,
            "height": self.height,
            "kind": if self.prompt_optional { "variation" } else { "edit" },
        })
    }
}

/// The request part of a stored job's params (without the picture record).
pub fn request_part(params: &Value) -> Value {
    let mut v = params.clone();
    if let Some(fields) = v.as_object_mut() {
        fields.remove(INIT_IMAGE_FIELD);
    }
    v
}

/// The picture a stored job was submitted with, from the image store.
pub fn stored_picture(state: &AppState, params: &Value) -> Result<Option<InitPicture>, ApiError> {
    let Some(record) = params.get(INIT_IMAGE_FIELD) else {
        return Ok(None);
    };
    let key = record["key"]
        .as_str()
        .ok_or_else(|| ApiError::internal("the job's picture record has no key"))?;
    let bytes = state
        .store
        .get(key)?
        .ok_or_else(|| ApiError::internal("the job's picture is no longer stored"))?;
    let img = image::load_from_memory(&bytes)
        .map_err(|e| ApiError::internal(format!("the job's stored picture: {e}")))?
        .to_rgb8();
    let kind = if record["kind"] == "variation" {
        Kind::Variation
    } else {
        Kind::Edit
    };
    let mask_key = record["mask_key"].as_str().map(str::to_string);
    let mask = match &mask_key {
        Some(k) => {
            let bytes = state
                .store
                .get(k)?
                .ok_or_else(|| ApiError::internal("the job's mask is no longer stored"))?;
            let m = image::load_from_memory(&bytes)
                .map_err(|e| ApiError::internal(format!("the job's stored mask: {e}")))?
                .to_luma8();
            Some(Arc::new(m.into_raw()))
        }
        None => None,
    };
    Ok(Some(InitPicture {
        width: img.width(),
        height: img.height(),
        rgb: Arc::new(img.into_raw()),
        default_strength: if mask.is_some() {
            1.0
        } else {
            kind.default_strength()
        },
        mask,
        mask_key,
        store_key: key.to_string(),
        prompt_optional: kind == Kind::Variation,
    }))
}

/// Edit a picture with a prompt (image-to-image; `strength` extension, default 0.8).
#[utoipa::path(post, path = "/v1/images/edits", tag = "images", security(("bearer" = [])),
    request_body(content_type = "multipart/form-data", description = "OpenAI's edit form: `image` (or `image[]`; the first is used), `prompt`, optional `mask` (same size; fully transparent pixels = the area to repaint: inpainting, default strength 1.0), `n`, `size`, `response_format`, `model`, plus the JSON extensions as text fields (`strength`, `steps`, `seed`, `sampler`, `negative_prompt`, `guidance_scale`, …)"),
    responses((status = 200, body = super::images::ImagesResponse), (status = 202, body = super::jobs::JobView),
        (status = 400, body = super::error::ErrorResponse, description = "bad form field or undecodable picture; `param` names it"),
        (status = 413, body = super::error::ErrorResponse), (status = 422, body = super::error::ErrorResponse)))]
#[post("/v1/images/edits")]
pub async fn edits(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    form: Multipart,
) -> Result<HttpResponse, ApiError> {
    handle(state, caller, http, form, Kind::Edit).await
}

/// Variations of a picture (image-to-image without a prompt; `strength` extension, default 0.6).
#[utoipa::path(post, path = "/v1/images/variations", tag = "images", security(("bearer" = [])),
    request_body(content_type = "multipart/form-data", description = "OpenAI's variation form: `image`, `n`, `size`, `response_format`, `model`, plus the JSON extensions as text fields"),
    responses((status = 200, body = super::images::ImagesResponse), (status = 202, body = super::jobs::JobView),
        (status = 400, body = super::error::ErrorResponse), (status = 413, body = super::error::ErrorResponse)))]
#[post("/v1/images/variations")]
pub async fn variations(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    form: Multipart,
) -> Result<HttpResponse, ApiError> {
    handle(state, caller, http, form, Kind::Variation).await
}

struct Form {
    fields: Map<String, Value>,
    image: Option<Vec<u8>>,
    mask: Option<Vec<u8>>,
}

/// Text fields typed as the JSON request expects them; the image kept as bytes.
async fn read_form(mut form: Multipart, limit: usize) -> Result<Form, ApiError> {
    const INTEGERS: &[&str] = &[
        "n",
        "steps",
        "seed",
        "clip_skip",
        "solver_order",
        "width",
        "height",
        "output_compression",
        "max_sequence_length",
    ];
    const FLOATS: &[&str] = &["guidance_scale", "strength", "true_cfg_scale"];
    // Object-valued extensions arrive as JSON text in their form field.
    const OBJECTS: &[&str] = &["skip_layer_guidance"];
    let mut out = Form {
        fields: Map::new(),
        image: None,
        mask: None,
    };
    let mut total = 0usize;
    while let Some(field) = form.next().await {
        let mut field = field.map_err(|e| ApiError::invalid("body", format!("bad form: {e}")))?;
        let name = field.name().unwrap_or_default().to_string();
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::invalid(&name, format!("could not read `{name}`: {e}")))?;
            total += chunk.len();
            if total > limit {
                return Err(ApiError::new(
                    actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "request_too_large",
                    format!("the form exceeds {limit} bytes"),
                )
                .with_param(&name));
            }
            bytes.extend_from_slice(&chunk);
        }
        match name.as_str() {
            "image" | "image[]" => {
                // Several pictures may be sent; image-to-image uses the first.
                if out.image.is_none() {
                    out.image = Some(bytes);
                }
            }
            "mask" => out.mask = Some(bytes),
            _ => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| ApiError::invalid(&name, format!("`{name}` must be text")))?;
                let bad = |what: &str| ApiError::invalid(&name, format!("`{name}` must be {what}"));
                let value = if INTEGERS.contains(&name.as_str()) {
                    Value::from(
                        text.trim()
                            .parse::<u64>()
                            .map_err(|_| bad("a whole number"))?,
                    )
                } else if FLOATS.contains(&name.as_str()) {
                    Value::from(text.trim().parse::<f64>().map_err(|_| bad("a number"))?)
                } else if OBJECTS.contains(&name.as_str()) {
                    serde_json::from_str(&text).map_err(|_| bad("a JSON object"))?
                } else if name == "async" {
                    Value::from(
                        text.trim()
                            .parse::<bool>()
                            .map_err(|_| bad("true or false"))?,
                    )
                } else {
                    Value::from(text)
                };
                out.fields.insert(name, value);
            }
        }
    }
    Ok(out)
}

async fn handle(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    form: Multipart,
    kind: Kind,
) -> Result<HttpResponse, ApiError> {
    caller.require(SCOPE_GENERATE)?;
    let mut form = read_form(form, state.limits.max_upload_bytes).await?;
    if kind == Kind::Variation {
        if form.fields.contains_key("prompt") {
            return Err(ApiError::invalid(
                "prompt",
                "variations take no prompt; use /v1/images/edits to change a picture with one",
            ));
        }
        form.fields.insert("prompt".into(), Value::from(""));
    }
    let bytes = form
        .image
        .take()
        .ok_or_else(|| ApiError::invalid("image", "the form needs an `image` file"))?;
    if form.mask.is_some() && kind == Kind::Variation {
        return Err(ApiError::invalid("mask", "variations take no mask"));
    }
    let form_has_mask = form.mask.is_some();
    let body = serde_json::to_vec(&Value::Object(form.fields)).unwrap_or_default();
    let mut req: ImageGenerationRequest = parse_json(&body)?;
    let picture = decode(&bytes, "image")?;
    // OpenAI's mask: a picture of the same size whose fully transparent pixels mark the area to
    // edit. diffusers' (and our pipeline's): white = repaint.
    let mask = match form.mask.take() {
        Some(bytes) => {
            let rgba = decode_rgba(&bytes)?;
            if rgba.dimensions() != picture.dimensions() {
                return Err(ApiError::invalid(
                    "mask",
                    format!(
                        "the mask is {}x{} but the image is {}x{}",
                        rgba.width(),
                        rgba.height(),
                        picture.width(),
                        picture.height()
                    ),
                ));
            }
            Some(image::GrayImage::from_fn(
                rgba.width(),
                rgba.height(),
                |x, y| image::Luma([if rgba.get_pixel(x, y)[3] == 0 { 255 } else { 0 }]),
            ))
        }
        None => None,
    };

    // Output size: as asked, else the picture's, within the size limit, rounded to a multiple of 8.
    let multiple = req
        .model
        .as_deref()
        .and_then(|m| state.engine.model(m))
        .or_else(|| state.engine.default_model())
        .map_or(8, |m| m.size_multiple as u32);
    let (mut w, mut h) = (picture.width(), picture.height());
    let max = state.limits.max_side as u32;
    if w.max(h) > max {
        let f = max as f64 / w.max(h) as f64;
        (w, h) = ((w as f64 * f) as u32, (h as f64 * f) as u32);
    }
    let asked = match req.size.as_deref() {
        Some("auto") | None => None,
        Some(s) => super::images::parse_size(s).map(|(a, b)| (a as u32, b as u32)),
    };
    let (w, h) = match (req.width, req.height, asked) {
        (Some(a), Some(b), _) => (a, b),
        (_, _, Some(size)) => size,
        _ => (w - w % multiple, h - h % multiple),
    };
    if w == 0 || h == 0 {
        return Err(ApiError::invalid(
            "image",
            format!("the picture is smaller than {multiple} pixels"),
        ));
    }
    req.size = Some(format!("{w}x{h}"));
    req.width = None;
    req.height = None;
    let resized = if (w, h) == (picture.width(), picture.height()) {
        picture
    } else {
        image::imageops::resize(&picture, w, h, image::imageops::FilterType::Lanczos3)
    };
    let mut png = Cursor::new(Vec::new());
    resized
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| ApiError::internal(format!("encoding the upload: {e}")))?;
    let store_key = state.store.put(png.get_ref(), "png")?;
    let mask = match mask {
        Some(m) => {
            // Nearest keeps the mask's edge sharp; the pipeline binarises at 0.5 anyway.
            let m = if m.dimensions() == (w, h) {
                m
            } else {
                image::imageops::resize(&m, w, h, image::imageops::FilterType::Nearest)
            };
            let mut png = Cursor::new(Vec::new());
            m.write_to(&mut png, image::ImageFormat::Png)
                .map_err(|e| ApiError::internal(format!("encoding the mask: {e}")))?;
            Some((
                state.store.put(png.get_ref(), "png")?,
                Arc::new(m.into_raw()),
            ))
        }
        None => None,
    };
    let init = InitPicture {
        width: w,
        height: h,
        rgb: Arc::new(resized.into_raw()),
        mask: mask.as_ref().map(|(_, m)| m.clone()),
        mask_key: mask.map(|(k, _)| k),
        store_key,
        // Inpainting defaults to repainting the masked area from scratch, as diffusers does.
        default_strength: if form_has_mask {
            1.0
        } else {
            kind.default_strength()
        },
        prompt_optional: kind == Kind::Variation,
    };
    tracing::debug!(
        kind = kind.name(),
        width = w,
        height = h,
        "picture uploaded"
    );
    run_request(&state, &caller, &http, req, Some(init)).await
}

/// Decode an uploaded picture with limits on its dimensions and on decoder allocations, so a
/// small file claiming a huge size is refused instead of exhausting memory.
fn decode(bytes: &[u8], field: &str) -> Result<image::RgbImage, ApiError> {
    Ok(decode_limited(bytes, field)?.to_rgb8())
}

fn decode_rgba(bytes: &[u8]) -> Result<image::RgbaImage, ApiError> {
    Ok(decode_limited(bytes, "mask")?.to_rgba8())
}

fn decode_limited(bytes: &[u8], field: &str) -> Result<image::DynamicImage, ApiError> {
    let bad = |why: String| ApiError::invalid(field, why);
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read the picture: {e}")))?;
    if reader.format().is_none() {
        return Err(bad("not a PNG, JPEG or WebP picture".into()));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_UPLOAD_SIDE);
    limits.max_image_height = Some(MAX_UPLOAD_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| bad(format!("cannot decode the picture: {e}")))
}
