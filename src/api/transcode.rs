//! `POST /transcode` and `GET /transcode/profiles` (API-COMPAT-FFMPEG.md
//! §2–3). A transcoded stream is registered beside its source: the source
//! under its usual id (md5 of its URL, shared with `POST /streams`), the
//! transcoded one under an id keyed on the rendered ffmpeg argv, so two
//! templates on one URL are two channels, while both read the one provider
//! connection of the source.

use std::collections::BTreeMap;

use md5::{Digest, Md5};
use serde_json::{json, Map, Value};

use super::{body, ApiReply, ApiRequest};
use crate::app::App;
use crate::registry::TranscodeSpec;
use crate::transcode::profiles::{self, Profile};
use crate::transcode::template;

/// The id of a transcoded stream: its URL and its ffmpeg argv.
pub fn transcoded_id(url: &str, args: &[String]) -> String {
    let mut h = Md5::new();
    h.update(url.as_bytes());
    h.update(b"|transcode|");
    for a in args {
        h.update(a.as_bytes());
        h.update([0x1f]);
    }
    hex::encode(h.finalize())
}

fn bad(msg: impl Into<String>) -> ApiReply {
    ApiReply::detail(400, msg)
}

/// `POST /transcode`.
pub fn create(app: &App, req: &ApiRequest) -> ApiReply {
    let parsed = match body::create_stream(&req.body) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let m = match body::object(&req.body) {
        Ok(m) => m,
        Err(e) => return e,
    };
    if let Some(r) = m.get("resolver").filter(|v| !v.is_null()) {
        return super::resolver::create(app, parsed, &m, r);
    }
    let profile_field = match m.get("profile") {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(v) => {
            return ApiReply::invalid(
                &["body", "profile"],
                "Input should be a valid string",
                v.clone(),
            )
        }
    };
    let variables = match string_map(&m, "profile_variables") {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut variables = variables;
    if let Some(f) = m.get("output_format").and_then(Value::as_str) {
        variables
            .entry("format".into())
            .or_insert_with(|| f.to_string());
    }
    let all = profiles::all(&app.config.transcode.profiles);
    let (name, tmpl, defaults) = if profile_field.starts_with('-') {
        ("custom".to_string(), profile_field.clone(), BTreeMap::new())
    } else {
        match all.iter().find(|p| p.name == profile_field) {
            Some(p) => (p.name.clone(), p.template.clone(), p.defaults.clone()),
            None => {
                let names: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
                return bad(format!(
                    "Profile '{profile_field}' not found. Available profiles: {}",
                    names.join(", ")
                ));
            }
        }
    };
    let rendered = match template::render(&tmpl, &variables, &defaults) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string()),
    };
    if app.ffmpeg.version.is_none() {
        return ApiReply::detail(
            503,
            format!(
                "ffmpeg not found ({}): install it or set transcode.ffmpeg",
                app.config.transcode.ffmpeg.display()
            ),
        );
    }
    // The source: the plain stream, as POST /streams would register it, but
    // without the caller's metadata: m3u-editor counts streams by metadata,
    // and the provider connection is counted once, on the transcoded stream.
    let mut source_spec = parsed.spec.clone();
    source_spec.metadata.clear();
    let source = match app.registry.register(source_spec) {
        Ok(r) => r,
        Err(max) => return super::streams::too_many_streams(app, max),
    };
    let id = transcoded_id(&parsed.spec.url, &rendered.args);
    let mut spec = parsed.spec;
    let variables_json = serde_json::to_string(&variables).unwrap_or_else(|_| "{}".into());
    let args_text = rendered.args.join(" ");
    // The contract's fields, with the caller's keys on top (as m3u-proxy).
    for (k, v) in [
        ("transcoding", "true".to_string()),
        ("profile", name.clone()),
        ("profile_variables", variables_json),
        ("ffmpeg_args", args_text),
    ] {
        spec.metadata.entry(k.into()).or_insert(v);
    }
    spec.live = Some(true);
    spec.transcode = Some(TranscodeSpec {
        source: source.stream.id.clone(),
        args: rendered.args.clone(),
        profile: name.clone(),
        hls: rendered.hls,
        hls_time: rendered.hls_time,
        hls_list_size: rendered.hls_list_size,
    });
    let reg = match app.registry.register_as(id.clone(), spec.clone()) {
        Ok(r) => r,
        Err(max) => return super::streams::too_many_streams(app, max),
    };
    if reg.replaced || source.replaced {
        app.persist();
        tracing::info!(stream_id = %id, source = %source.stream.id, profile = %name, "transcoded stream registered");
    }
    let user_agent = spec
        .user_agent
        .clone()
        .unwrap_or_else(|| app.config.upstream.user_agent.clone());
    let (endpoint, format) = if rendered.hls {
        (format!("/hls/{id}/playlist.m3u8"), "hls".to_string())
    } else {
        (format!("/stream/{id}"), rendered.format.clone())
    };
    let mut out = json!({
        "stream_id": id,
        "primary_url": spec.url,
        "failover_urls": spec.failover_urls,
        "user_agent": user_agent,
        "stream_type": "transcoded",
        "stream_endpoint": endpoint,
        "direct_url": format!("/stream/{id}"),
        "format": format,
        "profile": name,
        "profile_variables": variables,
        "ffmpeg_args": rendered.args,
        "message": "Transcoded stream created successfully",
    });
    if rendered.hls {
        out["playlist_url"] = json!(endpoint);
    }
    if let Some(meta) = parsed.raw_metadata {
        out["metadata"] = meta;
    }
    ApiReply::ok(out)
}

/// An optional `{str: str}` field.
fn string_map(m: &Map<String, Value>, field: &str) -> Result<BTreeMap<String, String>, ApiReply> {
    let mut out = BTreeMap::new();
    match m.get(field) {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                let Some(s) = body::python_str(v) else {
                    return Err(ApiReply::invalid(
                        &["body", &format!("{field}.{k}")],
                        "Input should be a valid string",
                        v.clone(),
                    ));
                };
                out.insert(k.clone(), s);
            }
        }
        Some(v) => {
            return Err(ApiReply::invalid(
                &["body", field],
                "Input should be a valid dictionary",
                v.clone(),
            ))
        }
    }
    Ok(out)
}

/// `GET /transcode/profiles`.
pub fn profiles(app: &App) -> ApiReply {
    let list: Vec<Value> = profiles::all(&app.config.transcode.profiles)
        .iter()
        .map(profile_json)
        .collect();
    ApiReply::ok(json!({
        "profiles": list,
        "hardware_acceleration": {
            "available": app.ffmpeg.hwaccel_available,
            "type": match app.config.transcode.hwaccel {
                crate::config::HwAccel::None => Value::Null,
                h => json!(h.as_str()),
            },
        },
        "default_variables": { "format": "mpegts" },
        "ffmpeg_available": app.ffmpeg.version.is_some(),
    }))
}

fn profile_json(p: &Profile) -> Value {
    let parameters: Map<String, Value> = profiles::parameters(&p.template)
        .into_iter()
        .map(|(name, default)| {
            let default = p.defaults.get(&name).cloned().or(default);
            (name, json!(default))
        })
        .collect();
    json!({
        "name": p.name,
        "description": p.description,
        "parameters": parameters,
        "template": p.template,
    })
}
