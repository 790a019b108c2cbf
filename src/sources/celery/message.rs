//! Celery's message on a Redis list, as kombu (and PostHog's plugin server) write it, and the
//! one task the source turns into events.
//!
//! Owns: decoding the envelope (JSON with a base64 body), both task protocols (2: the task name
//! in `headers.task`, a body of `[args, kwargs, embed]`; 1: a body of `{task, id, args,
//! kwargs}`), and reading `process_event_with_plugins`'s arguments.
//! Must never: accept a message it cannot read fully (it goes to the dead letters with the
//! reason), or invent a uuid that differs between two deliveries of the same task.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::sources::message_time;

/// PostHog's ingestion task.
pub const PROCESS_EVENT: &str = "posthog.tasks.process_event.process_event_with_plugins";

/// Event uuids derived from task ids live in this namespace (a fixed, random one).
const TASK_NAMESPACE: Uuid = Uuid::from_u128(0x7d1f_0c9a_45e3_4b8e_9a5e_3c2b_61f0_d4a7);

/// One decoded task.
#[derive(Debug, PartialEq)]
pub struct Task {
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
}

/// One event of a `process_event_with_plugins` task, before normalisation.
#[derive(Debug, PartialEq)]
pub struct TaskEvent {
    pub team_id: u64,
    pub ip: Option<String>,
    /// The task's `now`: when PostHog's capture received the event.
    pub now: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    /// The SDK's event, with `distinct_id` and `uuid` filled in.
    pub event: Map<String, Value>,
}

fn field<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// Decodes a message of the queue's list.
pub fn decode(raw: &[u8]) -> Result<Task, String> {
    let envelope: Value =
        serde_json::from_slice(raw).map_err(|e| format!("not a JSON message: {e}"))?;
    let content_type = field(&envelope, "content-type").unwrap_or("application/json");
    if content_type != "application/json" {
        return Err(format!(
            "content-type {content_type} (only application/json)"
        ));
    }
    let encoding = field(&envelope, "content-encoding").unwrap_or("utf-8");
    if !encoding.eq_ignore_ascii_case("utf-8") {
        return Err(format!("content-encoding {encoding} (only utf-8)"));
    }
    let properties = envelope.get("properties").cloned().unwrap_or(Value::Null);
    let body_encoding = field(&properties, "body_encoding").unwrap_or("base64");
    let body_text = field(&envelope, "body").ok_or("the message has no body")?;
    let body: Value = match body_encoding {
        "base64" => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(body_text)
                .map_err(|e| format!("the body is not base64: {e}"))?;
            serde_json::from_slice(&bytes).map_err(|e| format!("the body is not JSON: {e}"))?
        }
        other => return Err(format!("body_encoding {other} (only base64)")),
    };
    let headers = envelope.get("headers").cloned().unwrap_or(Value::Null);
    if let Some(name) = field(&headers, "task") {
        // Protocol 2.
        let id = field(&headers, "id")
            .or_else(|| field(&properties, "correlation_id"))
            .ok_or("a protocol 2 message without a task id")?;
        let Value::Array(parts) = body else {
            return Err("a protocol 2 body that is not [args, kwargs, embed]".into());
        };
        let mut parts = parts.into_iter();
        let args = match parts.next() {
            Some(Value::Array(args)) => args,
            _ => return Err("a protocol 2 body whose args are not a list".into()),
        };
        let kwargs = match parts.next() {
            Some(Value::Object(kwargs)) => kwargs,
            None | Some(Value::Null) => Map::new(),
            _ => return Err("a protocol 2 body whose kwargs are not an object".into()),
        };
        return Ok(Task {
            id: id.to_owned(),
            name: name.to_owned(),
            args,
            kwargs,
        });
    }
    // Protocol 1.
    let name = field(&body, "task").ok_or("no task name in the headers or the body")?;
    let id = field(&body, "id").ok_or("a protocol 1 message without a task id")?;
    let args = match body.get("args") {
        Some(Value::Array(args)) => args.clone(),
        None => Vec::new(),
        _ => return Err("a protocol 1 body whose args are not a list".into()),
    };
    let kwargs = match body.get("kwargs") {
        Some(Value::Object(kwargs)) => kwargs.clone(),
        _ => Map::new(),
    };
    Ok(Task {
        id: id.to_owned(),
        name: name.to_owned(),
        args,
        kwargs,
    })
}

impl Task {
    /// Argument `index`, given by position or else by `name` in the kwargs.
    fn arg(&self, index: usize, name: &str) -> Option<&Value> {
        self.args.get(index).or_else(|| self.kwargs.get(name))
    }
}

/// The event of a `process_event_with_plugins(distinct_id, ip, site_url, data, team_id, now,
/// sent_at)` task (positional, or by name in kwargs). As PostHog's handler, the event's own
/// fields win over the task's; an event without a uuid gets one derived from the task id, so a
/// task delivered twice is still one event.
pub fn process_event(task: &Task) -> Result<TaskEvent, String> {
    const NAMES: [&str; 7] = [
        "distinct_id",
        "ip",
        "site_url",
        "data",
        "team_id",
        "now",
        "sent_at",
    ];
    let arg = |index: usize| task.arg(index, NAMES[index]);
    let mut event = match arg(3) {
        Some(Value::Object(data)) => data.clone(),
        Some(Value::String(text)) => match serde_json::from_str(text) {
            Ok(Value::Object(data)) => data,
            _ => return Err("data is a string that is not a JSON object".into()),
        },
        _ => return Err("the task has no event (data)".into()),
    };
    let team_id = id_arg(arg(4)).ok_or("the task has no team_id")?;
    let now = message_time(arg(5))?.ok_or("the task has no now")?;
    let sent_at = message_time(arg(6))?;
    if !event.contains_key("distinct_id") {
        match arg(0) {
            Some(id @ (Value::String(_) | Value::Number(_))) => {
                event.insert("distinct_id".into(), id.clone());
            }
            _ => return Err("the task has no distinct_id".into()),
        }
    }
    let has_uuid = event
        .get("uuid")
        .and_then(Value::as_str)
        .is_some_and(|u| u.parse::<Uuid>().is_ok());
    if !has_uuid {
        let derived = Uuid::new_v5(&TASK_NAMESPACE, task.id.as_bytes());
        event.insert("uuid".into(), Value::String(derived.to_string()));
    }
    let ip = arg(1).and_then(Value::as_str).map(str::to_owned);
    Ok(TaskEvent {
        team_id,
        ip,
        now,
        sent_at,
        event,
    })
}

/// An id given as a number or as its text.
fn id_arg(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A job PostHog's app asks a plugin config to run (`plugin_job`).
#[derive(Debug, PartialEq)]
pub struct TaskJob {
    pub team_id: u64,
    pub config_id: u64,
    pub name: String,
    /// The payload, with PostHog's `$operation` (`start` or `stop`) in it, as JSON text.
    pub payload: String,
    /// The Celery task id: a task delivered twice queues one job.
    pub task_id: String,
}

/// The job of a `plugin_job(pluginConfigTeam, pluginConfigId, type, jobOp, payload)` task, as
/// the seed's plugin server queued it: the payload gets `$operation` = `jobOp`.
pub fn plugin_job(task: &Task) -> Result<TaskJob, String> {
    const NAMES: [&str; 5] = [
        "plugin_config_team",
        "plugin_config_id",
        "type",
        "job_op",
        "payload",
    ];
    let arg = |index: usize| task.arg(index, NAMES[index]);
    let team_id = id_arg(arg(0)).ok_or("the job task has no plugin config team")?;
    let config_id = id_arg(arg(1)).ok_or("the job task has no plugin config id")?;
    let name = match arg(2) {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        _ => return Err("the job task has no job type".into()),
    };
    let operation = match arg(3) {
        Some(Value::String(op)) => op.clone(),
        None | Some(Value::Null) => "start".into(),
        Some(_) => return Err("the job task's operation is not text".into()),
    };
    let mut payload = match arg(4) {
        Some(Value::Object(payload)) => payload.clone(),
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err("the job task's payload is not an object".into()),
    };
    payload.insert("$operation".into(), Value::String(operation));
    Ok(TaskJob {
        team_id,
        config_id,
        name,
        payload: Value::Object(payload).to_string(),
        task_id: task.id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(headers: Value, body: Value) -> Vec<u8> {
        let body = base64::engine::general_purpose::STANDARD.encode(body.to_string());
        json!({"body": body, "content-type": "application/json", "content-encoding": "utf-8",
               "headers": headers,
               "properties": {"body_encoding": "base64", "delivery_tag": "t",
                              "delivery_info": {"exchange": "", "routing_key": "posthog-plugins"}}})
        .to_string()
        .into_bytes()
    }

    fn args() -> Value {
        json!(["d1", "1.2.3.4", "http://x", {"event": "e", "properties": {"a": 1}}, 7,
               "2026-11-02T10:00:00.123456", "2026-11-02T09:59:59.000000+00:00"])
    }

    #[test]
    fn both_protocols_give_the_same_task() {
        let two = envelope(
            json!({"lang": "py", "task": PROCESS_EVENT, "id": "task-1"}),
            json!([args(), {}, {"callbacks": null}]),
        );
        let one = envelope(
            json!({}),
            json!({"task": PROCESS_EVENT, "id": "task-1", "args": args(), "kwargs": {}}),
        );
        assert_eq!(decode(&two).unwrap(), decode(&one).unwrap());
        let event = process_event(&decode(&two).unwrap()).unwrap();
        assert_eq!(event.team_id, 7);
        assert_eq!(event.ip.as_deref(), Some("1.2.3.4"));
        assert_eq!(event.now.to_rfc3339(), "2026-11-02T10:00:00.123456+00:00");
        assert!(event.sent_at.is_some());
        assert_eq!(event.event["distinct_id"], "d1");
        let again = process_event(&decode(&one).unwrap()).unwrap();
        assert_eq!(
            event.event["uuid"], again.event["uuid"],
            "derived from the task id"
        );
    }

    #[test]
    fn the_event_s_own_fields_win_and_kwargs_work() {
        let task = Task {
            id: "t".into(),
            name: PROCESS_EVENT.into(),
            args: Vec::new(),
            kwargs: json!({"distinct_id": "task-id", "ip": null, "site_url": "",
                           "data": {"event": "e", "distinct_id": "own",
                                    "uuid": "0190a0b0-0000-7000-8000-000000000001"},
                           "team_id": "3", "now": "2026-11-02T10:00:00Z", "sent_at": null})
            .as_object()
            .unwrap()
            .clone(),
        };
        let event = process_event(&task).unwrap();
        assert_eq!(event.event["distinct_id"], "own");
        assert_eq!(event.event["uuid"], "0190a0b0-0000-7000-8000-000000000001");
        assert_eq!((event.team_id, event.ip, event.sent_at), (3, None, None));
    }

    #[test]
    fn unreadable_messages_say_why() {
        assert!(decode(b"nope").unwrap_err().contains("JSON"));
        let pickled = json!({"body": "x", "content-type": "application/x-python-serialize"});
        assert!(decode(pickled.to_string().as_bytes())
            .unwrap_err()
            .contains("content-type"));
        let bad = envelope(
            json!({"task": PROCESS_EVENT, "id": "t"}),
            json!({"no": "list"}),
        );
        assert!(decode(&bad).unwrap_err().contains("protocol 2"));
        let task = decode(&envelope(
            json!({"task": PROCESS_EVENT, "id": "t"}),
            json!([["d", null, "", {"event": "e"}, 7], {}, {}]),
        ))
        .unwrap();
        assert!(process_event(&task).unwrap_err().contains("now"));
    }

    #[test]
    fn kombu_s_tagged_datetimes_are_times() {
        let tagged =
            json!({"__type__": "datetime", "__value__": "2026-12-02T16:45:55.870312+00:00"});
        let at = message_time(Some(&tagged)).unwrap().unwrap();
        assert_eq!(at.to_rfc3339(), "2026-12-02T16:45:55.870312+00:00");
    }

    #[test]
    fn a_plugin_job_task_is_the_config_s_job_with_posthog_s_operation() {
        let task = |args: Value| Task {
            id: "task-9".into(),
            name: "posthog.tasks.plugins.plugin_job".into(),
            args: args.as_array().cloned().unwrap_or_default(),
            kwargs: Map::new(),
        };
        let job = plugin_job(&task(json!([2, "39", "Export", "stop", {"a": 1}]))).unwrap();
        assert_eq!(
            (job.team_id, job.config_id, job.name.as_str()),
            (2, 39, "Export")
        );
        assert_eq!(
            serde_json::from_str::<Value>(&job.payload).unwrap(),
            json!({"a": 1, "$operation": "stop"})
        );
        assert_eq!(job.task_id, "task-9");
        // No operation or payload: PostHog's defaults ("start", {}).
        let bare = plugin_job(&task(json!([2, 39, "Export"]))).unwrap();
        assert_eq!(bare.payload, r#"{"$operation":"start"}"#);
        assert!(plugin_job(&task(json!([2, 39])))
            .unwrap_err()
            .contains("job type"));
        assert!(plugin_job(&task(json!([2, 39, "E", "start", [1]])))
            .unwrap_err()
            .contains("payload"));
        assert!(plugin_job(&task(json!([]))).unwrap_err().contains("team"));
    }
}
