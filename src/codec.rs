//! The one encoding of every value the appliance keeps in its own files: a format-version byte,
//! then the value in postcard.
//!
//! Owns: [`encode`] and [`decode`], and the rule that a value whose version this build does not
//! know is refused with a precise error rather than misread.
//! Must never: import another module of the crate (it is the bottom layer), or panic on bytes
//! read from disk.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why stored bytes could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty value")]
    Empty,
    #[error("format version {found} is unknown to this build (it knows {known})")]
    Version { found: u8, known: u8 },
    #[error("{0}")]
    Body(#[from] postcard::Error),
}

/// `version`, then `value` in postcard.
pub fn encode<T: Serialize + ?Sized>(version: u8, value: &T) -> Vec<u8> {
    // Writing postcard into a Vec fails only for types serde cannot express in it (maps with
    // `deserialize_any`-only values); every stored type here is plain data.
    postcard::to_extend(value, vec![version]).unwrap_or_else(|_| vec![version])
}

/// Reads a value written by [`encode`] with the same `version`.
pub fn decode<T: DeserializeOwned>(version: u8, bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&found, body)) if found == version => Ok(postcard::from_bytes(body)?),
        Some((&found, _)) => Err(CodecError::Version {
            found,
            known: version,
        }),
    }
}

/// Serialises a JSON value as its text in binary formats, so values holding arbitrary JSON
/// (plugin manifests) travel through postcard, which cannot describe untyped data; in JSON
/// itself the value stays a value. Use with `#[serde(with)]`.
pub mod json_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(value: &serde_json::Value, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            value.serialize(s)
        } else {
            s.serialize_str(&value.to_string())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
        if d.is_human_readable() {
            return serde_json::Value::deserialize(d);
        }
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_other_versions_are_refused() {
        let bytes = encode(3, &("team", 7u64));
        assert_eq!(bytes[0], 3);
        let back: (String, u64) = decode(3, &bytes).unwrap();
        assert_eq!(back, ("team".to_owned(), 7));
        assert!(matches!(
            decode::<(String, u64)>(4, &bytes),
            Err(CodecError::Version { found: 3, known: 4 })
        ));
        assert!(matches!(decode::<u64>(3, &[]), Err(CodecError::Empty)));
        assert!(decode::<(String, u64)>(3, &bytes[..3]).is_err());
    }
}
