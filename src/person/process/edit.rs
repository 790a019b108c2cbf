//! An event's properties text brought in line with what the person step changed: new keys are
//! appended to the text as it came, anything else rewrites it.

use serde_json::{Map, Value};

/// How an event's properties changed: new keys only (their text is appended), or more.
pub(super) struct Edit {
    /// A key that was there changed or went: the whole text is written again.
    pub(super) rewrite: bool,
    /// Keys added.
    pub(super) added: Vec<String>,
}

impl Edit {
    /// Brings `text` (the properties as they came) in line with `properties`.
    pub(super) fn apply(&self, text: &mut String, properties: &Map<String, Value>) {
        if self.rewrite {
            // Serialising a map of JSON values cannot fail.
            *text = serde_json::to_string(properties).unwrap_or_default();
            return;
        }
        let added: Vec<(&String, &Value)> = self
            .added
            .iter()
            .filter_map(|k| properties.get_key_value(k))
            .collect();
        if added.is_empty() {
            return;
        }
        let body = text.trim_end();
        let Some(open) = body.strip_suffix('}') else {
            *text = serde_json::to_string(properties).unwrap_or_default();
            return;
        };
        let mut out = String::with_capacity(text.len() + 256);
        out.push_str(open.trim_end());
        let mut first = out.ends_with('{');
        for (key, value) in added {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&serde_json::to_string(key).unwrap_or_default());
            out.push(':');
            out.push_str(&serde_json::to_string(value).unwrap_or_default());
        }
        out.push('}');
        *text = out;
    }
}
