//! `plugin.json`: what a plugin is called, which file holds its component, which hosts it may
//! call, and the schema of its config (in the shape of PostHog's plugin.json).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub version: String,
    /// The component file, relative to the plugin folder.
    pub main: String,
    /// Hosts the plugin may reach with `http.fetch` (exact host names or IPs).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    #[serde(default)]
    pub config: Vec<ConfigField>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigField {
    pub key: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default = "default_type")]
    pub kind: FieldKind,
    #[serde(default)]
    pub default: Option<serde_json::Value>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub secret: bool,
    #[serde(default)]
    pub choices: Vec<String>,
    #[serde(default)]
    pub hint: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    String,
    Json,
    Choice,
    Attachment,
}

fn default_type() -> FieldKind {
    FieldKind::String
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("plugin.json does not parse: {0}")]
    Parse(String),
    #[error("plugin.json: {0}")]
    Invalid(String),
    #[error("config {key:?}: {problem}")]
    Config { key: String, problem: String },
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if manifest.name.trim().is_empty() {
            return Err(ManifestError::Invalid("\"name\" is empty".into()));
        }
        if manifest.main.trim().is_empty()
            || manifest.main.contains("..")
            || manifest.main.starts_with('/')
        {
            return Err(ManifestError::Invalid(
                "\"main\" must name a .wasm file inside the plugin folder".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for field in &manifest.config {
            if !seen.insert(field.key.as_str()) {
                return Err(ManifestError::Invalid(format!(
                    "config key {:?} appears twice",
                    field.key
                )));
            }
            if field.kind == FieldKind::Choice && field.choices.is_empty() {
                return Err(ManifestError::Invalid(format!(
                    "config key {:?} is a choice without choices",
                    field.key
                )));
            }
        }
        Ok(manifest)
    }

    /// Checks operator-given values against the schema and fills in defaults. Values are text;
    /// `json` fields must parse as JSON and `choice` fields must be one of the choices.
    pub fn validate_config(
        &self,
        given: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, ManifestError> {
        let fail = |key: &str, problem: String| ManifestError::Config {
            key: key.to_owned(),
            problem,
        };
        if let Some(unknown) = given
            .keys()
            .find(|k| !self.config.iter().any(|f| &f.key == *k))
        {
            let known: Vec<&str> = self.config.iter().map(|f| f.key.as_str()).collect();
            return Err(fail(
                unknown,
                format!("not in the plugin's schema (known: {})", known.join(", ")),
            ));
        }
        let mut values = BTreeMap::new();
        for field in &self.config {
            let value = match given.get(&field.key) {
                Some(v) => Some(v.clone()),
                None => field.default.as_ref().map(|d| match d {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
            };
            let Some(value) = value.filter(|v| !v.is_empty() || !field.required) else {
                if field.required {
                    return Err(fail(&field.key, "is required".into()));
                }
                continue;
            };
            match field.kind {
                FieldKind::Json => {
                    serde_json::from_str::<serde_json::Value>(&value)
                        .map_err(|e| fail(&field.key, format!("is not valid JSON: {e}")))?;
                }
                FieldKind::Choice if !field.choices.contains(&value) => {
                    return Err(fail(
                        &field.key,
                        format!("must be one of {}", field.choices.join(", ")),
                    ));
                }
                _ => {}
            }
            values.insert(field.key.clone(), value);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest::parse(
            r#"{"name": "f", "main": "f.wasm", "config": [
                {"key": "properties", "type": "string", "required": true},
                {"key": "mode", "type": "choice", "choices": ["a", "b"], "default": "a"},
                {"key": "rules", "type": "json", "default": {"x": 1}}
            ]}"#,
        )
        .unwrap()
    }

    #[test]
    fn config_is_checked_against_the_schema() {
        let m = manifest();
        let given = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ok = m
            .validate_config(&given(&[("properties", "email")]))
            .unwrap();
        assert_eq!(ok["mode"], "a");
        assert_eq!(ok["rules"], r#"{"x":1}"#);
        let missing = m.validate_config(&given(&[])).unwrap_err();
        assert_eq!(missing.to_string(), "config \"properties\": is required");
        let bad_choice = m
            .validate_config(&given(&[("properties", "x"), ("mode", "c")]))
            .unwrap_err();
        assert_eq!(
            bad_choice.to_string(),
            "config \"mode\": must be one of a, b"
        );
        let bad_json = m
            .validate_config(&given(&[("properties", "x"), ("rules", "{")]))
            .unwrap_err();
        assert!(bad_json
            .to_string()
            .starts_with("config \"rules\": is not valid JSON"));
        let unknown = m
            .validate_config(&given(&[("properties", "x"), ("colour", "red")]))
            .unwrap_err();
        assert!(unknown.to_string().contains("not in the plugin's schema"));
    }

    #[test]
    fn broken_manifests_get_precise_errors() {
        assert!(matches!(Manifest::parse("{"), Err(ManifestError::Parse(_))));
        assert!(matches!(
            Manifest::parse(r#"{"name": "", "main": "x.wasm"}"#),
            Err(ManifestError::Invalid(_))
        ));
        assert!(matches!(
            Manifest::parse(r#"{"name": "x", "main": "../x.wasm"}"#),
            Err(ManifestError::Invalid(_))
        ));
        let twice = r#"{"name": "x", "main": "x.wasm", "config": [{"key": "a"}, {"key": "a"}]}"#;
        assert_eq!(
            Manifest::parse(twice).unwrap_err().to_string(),
            "plugin.json: config key \"a\" appears twice"
        );
    }
}
