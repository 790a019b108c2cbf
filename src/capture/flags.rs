//! The endpoints posthog-js calls besides capture: `/decide/`, `/flags/` and the remote config
//! under `/array/<token>/`. Feature flags are not part of the appliance, so each answers that
//! none are enabled, in the shape that lets the SDK load cleanly and switch to gzip.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

fn remote_config() -> Value {
    json!({
        "supportedCompression": ["gzip", "gzip-js"],
        "config": {"enable_collect_everything": true},
        "sessionRecording": false,
        "autocapture_opt_out": false,
        "capturePerformance": false,
        "siteApps": [],
        "surveys": false,
        "heatmaps": false,
        "hasFeatureFlags": false,
    })
}

/// `/decide/` (posthog-js up to ~1.2xx): flags plus remote config.
pub async fn decide() -> Json<Value> {
    let mut body = remote_config();
    if let Value::Object(map) = &mut body {
        for (key, value) in [
            ("featureFlags", json!({})),
            ("featureFlagPayloads", json!({})),
            ("errorsWhileComputingFlags", json!(false)),
            ("toolbarParams", json!({})),
            ("isAuthenticated", json!(false)),
            ("editorParams", json!({})),
        ] {
            map.insert(key.into(), value);
        }
    }
    Json(body)
}

/// `/flags/` (current posthog-js and server SDKs): flags only.
pub async fn flags() -> Json<Value> {
    Json(json!({
        "flags": {},
        "featureFlags": {},
        "featureFlagPayloads": {},
        "errorsWhileComputingFlags": false,
        "quotaLimited": [],
        "requestId": uuid::Uuid::now_v7().to_string(),
    }))
}

/// `/array/<token>/config`: the remote config as JSON.
pub async fn array_config(Path(token): Path<String>) -> Json<Value> {
    let mut body = remote_config();
    if let Value::Object(map) = &mut body {
        map.insert("token".into(), Value::String(token));
    }
    Json(body)
}

/// `/array/<token>/config.js`: the same config as the script the snippet loads.
pub async fn array_config_js(Path(token): Path<String>) -> Response {
    let Json(config) = array_config(Path(token.clone())).await;
    // serde_json quoting keeps the token inert inside the script whatever it contains.
    let script = format!(
        "(function(){{window._POSTHOG_REMOTE_CONFIG=window._POSTHOG_REMOTE_CONFIG||{{}};window._POSTHOG_REMOTE_CONFIG[{}]={{config:{},siteApps:[]}};}})();",
        Value::String(token),
        config
    );
    ([(header::CONTENT_TYPE, "application/javascript")], script).into_response()
}
