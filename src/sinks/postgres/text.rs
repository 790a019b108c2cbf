//! Text Postgres refuses, made storable: a NUL character in `text`, and the `\u0000` escape in
//! `jsonb`. Both become U+FFFD, as PostHog's capture does with NUL; everything else is untouched.

use std::borrow::Cow;

/// `value` without NUL characters.
pub(super) fn text_safe(value: &str) -> Cow<'_, str> {
    if value.contains('\0') {
        Cow::Owned(value.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(value)
    }
}

/// JSON text with every `\u0000` escape replaced by `\ufffd` (an escaped backslash followed by
/// `u0000` is text, and is kept).
pub(super) fn json_safe(json: &str) -> Cow<'_, str> {
    if !json.contains("\\u0000") && !json.contains('\0') {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        if let Some(after) = escape.strip_prefix("\\u0000") {
            out.push_str("\\ufffd");
            rest = after;
        } else {
            // Any other escape is two characters at least; copy both so that an escaped
            // backslash never pairs with what follows it.
            let len = escape[1..].chars().next().map_or(1, |c| 1 + c.len_utf8());
            out.push_str(&escape[..len]);
            rest = &escape[len..];
        }
    }
    out.push_str(rest);
    text_safe(&out).into_owned().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_become_replacement_characters() {
        let stored = json_safe(r#"{"a":"x\u0000y","b":"\\u0000","c":"\\\u0000"}"#);
        assert_eq!(stored, r#"{"a":"x\ufffdy","b":"\\u0000","c":"\\\ufffd"}"#);
        let value: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(value["a"], "x\u{FFFD}y");
        assert_eq!(value["b"], "\\u0000");
    }

    #[test]
    fn ordinary_text_is_borrowed() {
        assert!(matches!(json_safe(r#"{"a":"\n"}"#), Cow::Borrowed(_)));
        assert!(matches!(text_safe("plain"), Cow::Borrowed(_)));
        assert_eq!(text_safe("a\0b"), "a\u{FFFD}b");
    }
}
