//! Management API of the imports: `GET /playlists` (status of each list)
//! and `POST /playlists/refresh` (fetch every list now, `?name=` one).

use serde_json::json;

use crate::api::{ApiReply, ApiRequest};
use crate::app::App;

/// `GET /playlists`.
pub fn status(app: &App) -> ApiReply {
    ApiReply::ok(json!({ "playlists": app.playlists.stats() }))
}

/// `POST /playlists/refresh[?name=]`: refreshes now and reports each list's
/// outcome; a failure keeps that list's previous streams, as on the timer.
pub async fn refresh(app: &App, req: &ApiRequest) -> ApiReply {
    let name = req.param("name");
    let picked: Vec<usize> = app
        .playlists
        .lists
        .iter()
        .enumerate()
        .filter(|(_, l)| name.is_none_or(|n| n == l.config.name))
        .map(|(i, _)| i)
        .collect();
    if picked.is_empty() {
        return ApiReply::detail(
            404,
            match name {
                Some(n) => format!("No playlist named {n:?}"),
                None => "No playlists are configured".to_owned(),
            },
        );
    }
    let mut results = Vec::new();
    for i in picked {
        let list_name = &app.playlists.lists[i].config.name;
        results.push(match super::import::refresh(app, i).await {
            Ok(s) => json!({ "name": list_name, "ok": true, "summary": s }),
            Err(e) => json!({ "name": list_name, "ok": false, "error": e }),
        });
    }
    ApiReply::ok(json!({ "results": results }))
}
