//! Every kind of bad input gets a precise 4xx with a JSON body, harms nothing already stored,
//! and leaves the server serving.

mod common;

use std::io::Write;

use common::{create_team, read_events, Appliance, TOKEN};
use serde_json::{json, Value};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

struct Case {
    name: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    detail: &'static str,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
    detail: &'static str,
) -> Case {
    Case {
        name,
        path,
        content_type: "application/json",
        body: body.into(),
        status,
        code,
        detail,
    }
}

#[tokio::test]
async fn bad_requests_get_precise_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    create_team(dir.path(), "t", TOKEN);
    let app = Appliance::start(
        dir.path(),
        &[
            ("CAPTURE_MAX_BODY_BYTES", "65536"),
            ("CAPTURE_MAX_DECOMPRESSED_BYTES", "1048576"),
            ("CAPTURE_MAX_EVENT_BYTES", "4096"),
        ],
    );
    // A fresh connection per request: a server that refuses a body before reading all of it
    // (413) closes that connection, and a pooled client could send the next case down it.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let good = |event: &str| {
        json!({"api_key": TOKEN, "batch": [{"event": event, "distinct_id": "u"}]}).to_string()
    };
    let mut corrupt_gzip = gzip(good("x").as_bytes());
    corrupt_gzip.truncate(corrupt_gzip.len() - 12);
    let mut bad_utf8 =
        br#"{"api_key": "phc_testProjectToken123", "event": "e", "distinct_id": "#.to_vec();
    bad_utf8.extend_from_slice(b"\"\xff\xfe\"}");
    let deep = format!(
        r#"{{"api_key": "{TOKEN}", "batch": [{{"event": "e", "distinct_id": "u", "properties": {{"p": {}1{}}}}}]}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );

    let cases = vec![
        case("malformed JSON", "/batch/", r#"{"api_key": "phc_testProjectToken123", "batch": [{"event": "#, 400, "invalid_payload", "payload is not valid JSON"),
        case("empty body", "/e/", "", 400, "invalid_payload", "payload is empty"),
        case("a JSON number", "/e/", "42", 400, "invalid_payload", "got a number"),
        case("bad base64", "/e/?compression=base64", "!!!!not-base64!!!!", 400, "invalid_encoding", "not valid base64"),
        case("corrupt gzip", "/batch/", corrupt_gzip, 400, "invalid_encoding", "not valid gzip"),
        case("gzip bomb", "/batch/", gzip(&vec![b' '; 64 << 20]), 413, "payload_too_large", "once decompressed"),
        case("body over the limit", "/batch/", vec![b' '; 100_000], 413, "payload_too_large", "larger than the limit of 65536 bytes"),
        case("unknown compression", "/e/?compression=zstd", "{}", 400, "unsupported_compression", "unsupported compression \"zstd\""),
        case("invalid UTF-8", "/e/", bad_utf8, 400, "invalid_encoding", "not valid UTF-8"),
        case("absurd nesting", "/batch/", deep, 400, "invalid_payload", "nested deeper than 128 levels"),
        case("missing token", "/e/", r#"{"event": "e", "distinct_id": "u"}"#, 401, "invalid_api_key", "no project token"),
        case("unknown token", "/e/", r#"{"event": "e", "distinct_id": "u", "token": "phc_nobodyHasThisToken"}"#, 401, "invalid_api_key", "unknown project token"),
        case("personal API key", "/batch/", r#"{"api_key": "phx_personalKey123", "batch": [{"event": "e", "distinct_id": "u"}]}"#, 401, "invalid_api_key", "personal API keys"),
        case("no event name", "/batch/", json!({"api_key": TOKEN, "batch": [{"distinct_id": "u"}]}).to_string(), 400, "invalid_events", "missing event name"),
        case("no distinct_id", "/batch/", json!({"api_key": TOKEN, "batch": [{"event": "e"}]}).to_string(), 400, "invalid_events", "missing distinct_id"),
        case("invalid uuid", "/batch/", json!({"api_key": TOKEN, "batch": [{"event": "e", "distinct_id": "u", "uuid": "not-a-uuid"}]}).to_string(), 400, "invalid_events", "is not a valid UUID"),
        case("event over the size limit", "/batch/", json!({"api_key": TOKEN, "batch": [{"event": "e", "distinct_id": "u", "properties": {"x": "y".repeat(5000)}}]}).to_string(), 400, "invalid_events", "more than the limit of 4096"),
    ];
    for c in &cases {
        let response = client
            .post(app.url(c.path))
            .header("Content-Type", c.content_type)
            .body(c.body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let status = response.status().as_u16();
        let body: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{}: the error body is JSON: {e}", c.name));
        assert_eq!(status, c.status, "{}: {body}", c.name);
        assert_eq!(body["code"], c.code, "{}: {body}", c.name);
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(c.detail),
            "{}: detail {detail:?} should mention {:?}",
            c.name,
            c.detail
        );
    }

    // A body streamed without Content-Length is cut off at the limit too.
    let chunks = futures_stream(vec![vec![b' '; 40_000], vec![b' '; 40_000]]);
    let response = client
        .post(app.url("/batch/"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    // A batch with good and bad events: the good ones are stored, the bad ones listed.
    let mixed = json!({"api_key": TOKEN, "batch": [
        {"event": "kept-1", "distinct_id": "u"},
        {"event": "dropped"},
        {"event": "kept-2", "distinct_id": "u", "uuid": "01920000-0000-7000-8000-000000000002"},
    ]});
    let response = client
        .post(app.url("/batch/"))
        .json(&mixed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(
        body["rejected"],
        json!([{"index": 1, "error": "missing distinct_id (top level or in properties)"}])
    );

    // Full queue back-pressure is a 503 with Retry-After; idle mode proves the header path
    // elsewhere. Here: the server still serves and good events still land.
    let response = client
        .post(app.url("/e/"))
        .body(good("after-the-storm"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        client
            .get(app.url("/_health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    app.wait_drained().await;
    let mut names: Vec<String> = read_events(&app.sqlite_path())
        .into_iter()
        .map(|r| r.event)
        .collect();
    names.sort();
    assert_eq!(names, vec!["after-the-storm", "kept-1", "kept-2"]);
}

fn futures_stream(
    chunks: Vec<Vec<u8>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    struct Chunks(std::vec::IntoIter<Vec<u8>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next().map(Ok))
        }
    }
    Chunks(chunks.into_iter())
}
