//! `/webhooks…`: registration, listing, removal and a test delivery, in
//! m3u-proxy's shapes (API-COMPAT.md §2, §6). Registration de-duplicates by
//! normalized URL (m3u-editor's `--force` re-registers), and removal takes
//! `webhook_url` from the query or from a JSON body (m3u-editor sends a body).

use serde_json::{json, Value};

use super::{body, ApiReply, ApiRequest};
use crate::app::App;
use crate::events::{TestError, Webhook};

/// `POST /webhooks`.
pub fn add(app: &App, req: &ApiRequest) -> ApiReply {
    let hook = match parse(req) {
        Ok(h) => h,
        Err(e) => return e,
    };
    match app.events.add_webhook(hook) {
        Ok((hook, created)) => {
            app.persist();
            added_reply(&hook, created)
        }
        Err(e) => ApiReply::invalid(&["body"], e, Value::Null),
    }
}

/// The reply of a registration.
pub fn added_reply(hook: &Webhook, created: bool) -> ApiReply {
    tracing::info!(webhook = %redact(&hook.url), created, "webhook registered");
    ApiReply::ok(json!({
        "message": if created { "Webhook added successfully" } else { "Webhook updated (already registered)" },
        "webhook_url": hook.url,
        "events": hook.events,
    }))
}

/// A `POST /webhooks` body as a checked, normalized webhook, or the 422.
pub fn parse(req: &ApiRequest) -> Result<Webhook, ApiReply> {
    let mut m = body::object(&req.body)?;
    if !matches!(m.get("url"), Some(Value::String(_))) {
        return Err(ApiReply::invalid(
            &["body", "url"],
            "Field required",
            m.get("url").cloned().unwrap_or(Value::Null),
        ));
    }
    // m3u-proxy (pydantic) takes a whole float for the integer retry_attempts.
    if let Some(n) = m.get("retry_attempts").and_then(Value::as_f64) {
        if n.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&n) {
            m.insert("retry_attempts".into(), json!(n as u64));
        }
    }
    let fields = m.clone();
    let hook: Webhook = serde_json::from_value(Value::Object(m))
        .map_err(|e| ApiReply::invalid(&["body"], e.to_string(), Value::Null))?;
    hook.validated().map_err(|e| {
        // The message names the field first: "timeout: must be at least 1 ...".
        match e.split_once(':').and_then(|(f, _)| fields.get_key_value(f)) {
            Some((field, input)) => ApiReply::invalid(&["body", field], e, input.clone()),
            None => ApiReply::invalid(&["body"], e, Value::Null),
        }
    })
}

/// `GET /webhooks`.
pub fn list(app: &App) -> ApiReply {
    let hooks: Vec<Value> = app
        .events
        .webhooks()
        .iter()
        .map(Webhook::public_json)
        .collect();
    ApiReply::ok(json!({ "webhooks": hooks }))
}

/// `webhook_url` from the query, else from a JSON body (`webhook_url` or `url`).
pub fn target(req: &ApiRequest) -> Result<String, ApiReply> {
    if let Some(u) = req.param("webhook_url") {
        return Ok(u.to_string());
    }
    let m = body::object(&req.body)?;
    match m.get("webhook_url").or_else(|| m.get("url")) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(ApiReply::invalid(
            &["query", "webhook_url"],
            "Field required",
            Value::Null,
        )),
    }
}

/// `DELETE /webhooks`.
pub fn remove(app: &App, req: &ApiRequest) -> ApiReply {
    let url = match target(req) {
        Ok(u) => u,
        Err(e) => return e,
    };
    if !app.events.remove_webhook(&url) {
        return ApiReply::detail(404, "Webhook not found");
    }
    app.persist();
    removed_reply(&url)
}

/// The reply of a removal.
pub fn removed_reply(url: &str) -> ApiReply {
    ApiReply::ok(json!({ "message": format!("Webhook {} removed successfully", redact(url)) }))
}

/// `POST /webhooks/test`: one test event to a registered webhook, now.
pub async fn test(app: &App, req: &ApiRequest) -> ApiReply {
    let url = match target(req) {
        Ok(u) => u,
        Err(e) => return e,
    };
    match app.events.test(&url).await {
        Ok(out) => ApiReply::ok(json!({
            "message": "Test webhook sent",
            "event_id": out.event_id,
            "status_code": out.status,
        })),
        Err(TestError::NotFound) => ApiReply::detail(404, "Webhook not found"),
        Err(TestError::Failed { event_id, error }) => ApiReply::ok(json!({
            "message": "Test webhook failed",
            "event_id": event_id,
            "error": error,
        })),
    }
}

/// A webhook URL for logs and messages: no query, no credentials.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string()
        }
        Err(_) => "<invalid url>".into(),
    }
}
