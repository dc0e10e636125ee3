//! `POST /transcode` with `resolver` (API-COMPAT-FFMPEG.md §2, §5): a page
//! URL played through streamlink or yt-dlp. The arguments pass an allowlist
//! (400 naming the option refused), a cookies file must be inside
//! `resolvers.cookies_dir` (400), and a tool that is not installed is a 503.

use md5::{Digest, Md5};
use serde_json::{json, Map, Value};

use super::{body::CreateStream, ApiReply};
use crate::app::App;
use crate::resolvers::{args, cookies, ResolverSpec, Tool};

/// The id of a resolver stream: its URL, tool, arguments and cookies file.
fn resolver_id(url: &str, r: &ResolverSpec) -> String {
    let mut h = Md5::new();
    h.update(url.as_bytes());
    h.update(b"|resolver|");
    h.update(r.tool.name().as_bytes());
    h.update(b"|");
    h.update(r.selector.as_bytes());
    for o in &r.options {
        h.update([0x1f]);
        h.update(o.as_bytes());
    }
    if let Some(c) = &r.cookies {
        h.update(b"|cookies|");
        h.update(c.as_os_str().as_encoded_bytes());
    }
    hex::encode(h.finalize())
}

fn opt_string(m: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiReply> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(ApiReply::invalid(
            &["body", field],
            "Input should be a valid string",
            v.clone(),
        )),
    }
}

pub fn create(
    app: &App,
    parsed: CreateStream,
    m: &Map<String, Value>,
    resolver: &Value,
) -> ApiReply {
    let Some(tool) = resolver.as_str().and_then(Tool::parse) else {
        return ApiReply::invalid(
            &["body", "resolver"],
            "Input should be 'streamlink' or 'ytdlp'",
            resolver.clone(),
        );
    };
    let raw_args = match opt_string(m, "resolver_args") {
        Ok(a) => a.unwrap_or_default(),
        Err(e) => return e,
    };
    let checked = match args::check(tool, &raw_args) {
        Ok(c) => c,
        Err(e) => return ApiReply::detail(400, e),
    };
    let cookies_path = match opt_string(m, "cookies_path") {
        Ok(p) => p.filter(|p| !p.trim().is_empty()),
        Err(e) => return e,
    };
    if opt_string(m, "cookies").is_ok_and(|c| c.is_some_and(|c| !c.trim().is_empty())) {
        return ApiReply::detail(
            400,
            "cookies: cookies as text are not accepted; put the file in resolvers.cookies_dir and send cookies_path",
        );
    }
    let cookies = match cookies_path {
        None => None,
        Some(p) => {
            let dir = app.config.resolvers.cookies_dir.as_deref();
            let check = cookies::validate(dir, &p, chrono::Utc::now().timestamp());
            if !check.valid {
                return ApiReply::detail(400, format!("cookies_path: {}", check.message));
            }
            match cookies::confine(dir, &p) {
                Ok(real) => Some(real),
                Err(e) => return ApiReply::detail(400, format!("cookies_path: {e}")),
            }
        }
    };
    if app.resolvers.versions.of(tool).is_none() {
        return ApiReply::detail(
            503,
            format!(
                "{} not found ({}): install it or set {}",
                tool.name(),
                tool.program(&app.config.resolvers).display(),
                tool.config_key()
            ),
        );
    }
    let r = ResolverSpec {
        tool,
        selector: checked.selector,
        options: checked.options,
        cookies,
        raw_args: raw_args.clone(),
    };
    let id = resolver_id(&parsed.spec.url, &r);
    let mut spec = parsed.spec;
    spec.live = Some(true);
    spec.metadata
        .entry("resolver".into())
        .or_insert_with(|| tool.name().to_string());
    spec.resolver = Some(r);
    let reg = match app.registry.register_as(id.clone(), spec.clone()) {
        Ok(r) => r,
        Err(max) => return super::streams::too_many_streams(app, max),
    };
    if reg.replaced {
        app.persist();
        tracing::info!(stream_id = %id, resolver = tool.name(), "resolver stream registered");
    }
    let user_agent = spec
        .user_agent
        .clone()
        .unwrap_or_else(|| app.config.upstream.user_agent.clone());
    let endpoint = format!("/stream/{id}");
    let mut out = json!({
        "stream_id": id,
        "primary_url": spec.url,
        "failover_urls": spec.failover_urls,
        "user_agent": user_agent,
        "stream_type": "resolver",
        "stream_endpoint": endpoint,
        "direct_url": endpoint,
        "format": "mpegts",
        "resolver": match tool { Tool::Streamlink => "streamlink", Tool::YtDlp => "ytdlp" },
        "resolver_args": raw_args,
        "message": "Resolver stream created successfully",
    });
    if let Some(meta) = parsed.raw_metadata {
        out["metadata"] = meta;
    }
    ApiReply::ok(out)
}
