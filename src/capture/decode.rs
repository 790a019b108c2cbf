//! Undoing the encodings SDKs use, in the order PostHog's capture applies them: payload from the
//! query's `data` or a form's `data` or the body; then the compression hint (`compression`
//! from query or form, `Content-Encoding`); gzip recognised by its magic bytes whatever the hint
//! says; base64 recognised when the payload is not JSON already.

use std::io::Read;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

use super::budget::Charge;
use super::error::CaptureError;
use super::lz64::Lz64Error;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Only very old posthog-js releases send lz64, with small batches; its output is bounded as it
/// is produced (see `lz64`), and its input is kept small too.
const MAX_LZ64_INPUT: usize = 512 * 1024;
/// lz64 payloads unpack to at most this many characters (they cost up to five bytes each while
/// decoded), whatever `CAPTURE_MAX_DECOMPRESSED_BYTES` allows other encodings.
const MAX_LZ64_UNITS: usize = 8 << 20;

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(true);
const BASE64_STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
const BASE64_URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

/// The parts of a request that say how its payload is encoded.
pub struct EncodedRequest<'a> {
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    /// `data` from the query string, already percent-decoded.
    pub query_data: Option<&'a str>,
    /// `compression` from the query string.
    pub query_compression: Option<&'a str>,
    pub body: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Base64,
    Lz64,
}

fn parse_compression(hint: &str) -> Result<Compression, CaptureError> {
    match hint.trim().to_ascii_lowercase().as_str() {
        "" | "none" | "identity" => Ok(Compression::None),
        "gzip" | "gzip-js" => Ok(Compression::Gzip),
        "base64" | "b64" => Ok(Compression::Base64),
        "lz64" | "lz-string" | "lzstring" => Ok(Compression::Lz64),
        other => Err(CaptureError::UnsupportedCompression(other.to_owned())),
    }
}

/// Returns the payload as JSON text bytes (not yet checked to be UTF-8 or JSON). Every buffer
/// it makes is charged to `charge` as it grows.
pub fn decode_payload(
    req: &EncodedRequest<'_>,
    max_decompressed: usize,
    charge: &mut Charge,
) -> Result<Vec<u8>, CaptureError> {
    let mut hint = req.query_compression.map(parse_compression).transpose()?;
    let is_form = req.content_type.is_some_and(|ct| {
        ct.trim_start()
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    });

    // The payload as sent (a copy of the body or of the query's data).
    charge.grow_blocking(req.query_data.map_or(req.body.len(), str::len))?;
    let payload: Vec<u8> = if let Some(data) = req.query_data {
        restore_plus(data)
    } else if is_form {
        let mut data = None;
        for (key, value) in form_urlencoded::parse(req.body) {
            match key.as_ref() {
                "data" => data = Some(restore_plus(&value)),
                "compression" if hint.is_none() => hint = Some(parse_compression(&value)?),
                _ => {}
            }
        }
        // A form without `data` is taken as it is: some senders mislabel plain JSON.
        data.unwrap_or_else(|| req.body.to_vec())
    } else {
        req.body.to_vec()
    };

    if let Some(encoding) = req.content_encoding {
        match encoding.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => hint = Some(Compression::Gzip),
            "" | "identity" => {}
            other => return Err(CaptureError::UnsupportedContentEncoding(other.to_owned())),
        }
    }

    let limit = max_decompressed;
    let decoded = match hint.unwrap_or(Compression::None) {
        Compression::Lz64 => decode_lz64(&payload, limit, charge)?,
        Compression::Base64 => maybe_gunzip(decode_base64(&payload, charge)?, limit, charge)?,
        Compression::Gzip if !payload.starts_with(&GZIP_MAGIC) && looks_like_base64(&payload) => {
            maybe_gunzip(decode_base64(&payload, charge)?, limit, charge)?
        }
        Compression::Gzip => gunzip(&payload, limit, charge)?,
        Compression::None if payload.starts_with(&GZIP_MAGIC) => gunzip(&payload, limit, charge)?,
        Compression::None if looks_like_base64(&payload) => {
            maybe_gunzip(decode_base64(&payload, charge)?, limit, charge)?
        }
        Compression::None => payload,
    };
    if decoded.len() > max_decompressed {
        return Err(CaptureError::DecompressedTooLarge {
            limit: max_decompressed,
        });
    }
    Ok(decoded)
}

/// Form decoding turns `+` into a space; base64 never holds spaces, so turn them back.
fn restore_plus(text: &str) -> Vec<u8> {
    text.replace(' ', "+").into_bytes()
}

/// True when the payload does not start like JSON and consists only of base64 characters.
/// (Base64 of a JSON document starts with a letter: `ey` for `{"`, `W` for `[`, `H4sI` for gzip.)
fn looks_like_base64(payload: &[u8]) -> bool {
    let trimmed = payload.trim_ascii();
    !trimmed.is_empty()
        && trimmed[0].is_ascii_alphabetic()
        && trimmed.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_' | b'\r' | b'\n')
        })
}

fn decode_base64(payload: &[u8], charge: &mut Charge) -> Result<Vec<u8>, CaptureError> {
    // The compacted text, then the decoded bytes (three quarters of it).
    charge.grow_blocking(payload.len() + payload.len() / 4 * 3 + 3)?;
    let compact: Vec<u8> = payload
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    BASE64_STANDARD
        .decode(&compact)
        .or_else(|first| BASE64_URL_SAFE.decode(&compact).map_err(|_| first))
        .map_err(|e| CaptureError::InvalidBase64(e.to_string()))
}

fn maybe_gunzip(
    bytes: Vec<u8>,
    limit: usize,
    charge: &mut Charge,
) -> Result<Vec<u8>, CaptureError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        gunzip(&bytes, limit, charge)
    } else {
        Ok(bytes)
    }
}

/// Output of a decompression grows in steps of this size, each charged first.
const INFLATE_STEP: usize = 1 << 20;

/// Decompresses gzip in steps, charging each before it is read and stopping as soon as the
/// output passes `limit` (a gzip bomb costs at most `limit` bytes of memory, all of it charged).
fn gunzip(bytes: &[u8], limit: usize, charge: &mut Charge) -> Result<Vec<u8>, CaptureError> {
    let mut decoder = flate2::read::MultiGzDecoder::new(bytes);
    let mut out = Vec::new();
    loop {
        let step = INFLATE_STEP.min(limit + 1 - out.len());
        charge.grow_blocking(step)?;
        let read = (&mut decoder)
            .take(step as u64)
            .read_to_end(&mut out)
            .map_err(|e| CaptureError::InvalidGzip(e.to_string()))?;
        if out.len() > limit {
            return Err(CaptureError::DecompressedTooLarge { limit });
        }
        if read < step {
            return Ok(out);
        }
    }
}

fn decode_lz64(
    payload: &[u8],
    max_decompressed: usize,
    charge: &mut Charge,
) -> Result<Vec<u8>, CaptureError> {
    if payload.len() > MAX_LZ64_INPUT {
        return Err(CaptureError::BodyTooLarge {
            limit: MAX_LZ64_INPUT,
        });
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| CaptureError::InvalidLz64)?
        .trim();
    // lz-string skips characters outside its alphabet instead of failing, so check first.
    if text.is_empty()
        || !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    {
        return Err(CaptureError::InvalidLz64);
    }
    // Each UTF-16 unit becomes at least one byte of UTF-8, so the byte limit bounds the units.
    // Units take two bytes, then up to three each once converted: five per unit are charged.
    let mut refused = None;
    let mut reserve = |units: usize| match charge.grow_blocking(units * 5) {
        Ok(()) => true,
        Err(e) => {
            refused = Some(e);
            false
        }
    };
    let max_units = max_decompressed.min(MAX_LZ64_UNITS);
    let wide = match super::lz64::decompress_reserving(text, max_units, &mut reserve) {
        Ok(wide) if !wide.is_empty() => wide,
        Ok(_) | Err(Lz64Error::Invalid) => return Err(CaptureError::InvalidLz64),
        Err(Lz64Error::TooLarge) => {
            return Err(refused.unwrap_or(CaptureError::DecompressedTooLarge { limit: max_units }))
        }
    };
    String::from_utf16(&wide)
        .map(String::into_bytes)
        .map_err(|_| CaptureError::InvalidLz64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::budget::MemoryBudget;
    use std::io::Write;

    const JSON: &str = r#"{"event":"e","properties":{"distinct_id":"d","token":"phc_x"}}"#;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn req<'a>(body: &'a [u8]) -> EncodedRequest<'a> {
        EncodedRequest {
            content_type: None,
            content_encoding: None,
            query_data: None,
            query_compression: None,
            body,
        }
    }

    /// Decodes with a budget large enough never to refuse.
    fn decode(req: &EncodedRequest<'_>, limit: usize) -> Result<Vec<u8>, CaptureError> {
        decode_payload(req, limit, &mut MemoryBudget::new(1 << 32).start())
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn every_sdk_encoding_decodes_to_the_same_json() {
        let limit = 1 << 20;
        let gz = gzip(JSON.as_bytes());
        // Plain JSON.
        assert_eq!(
            decode(&req(JSON.as_bytes()), limit).unwrap(),
            JSON.as_bytes()
        );
        // gzip sniffed with no hint (current posthog-js).
        assert_eq!(decode(&req(&gz), limit).unwrap(), JSON.as_bytes());
        // Content-Encoding: gzip (server SDKs).
        let r = EncodedRequest {
            content_encoding: Some("gzip"),
            ..req(&gz)
        };
        assert_eq!(decode(&r, limit).unwrap(), JSON.as_bytes());
        // Form data= base64 with compression=base64 in the query (legacy posthog-js).
        let form = format!(
            "data={}",
            form_urlencoded::byte_serialize(b64(JSON.as_bytes()).as_bytes()).collect::<String>()
        );
        let r = EncodedRequest {
            content_type: Some("application/x-www-form-urlencoded"),
            query_compression: Some("base64"),
            ..req(form.as_bytes())
        };
        assert_eq!(decode(&r, limit).unwrap(), JSON.as_bytes());
        // The same with the '+' of base64 sent unescaped (turned into spaces by form decoding).
        let with_plus = b64(b"{\"a\":\"\xfb\xff\"}".as_slice());
        let raw_form = format!("data={with_plus}");
        let r = EncodedRequest {
            content_type: Some("application/x-www-form-urlencoded"),
            ..req(raw_form.as_bytes())
        };
        assert_eq!(decode(&r, limit).unwrap(), b"{\"a\":\"\xfb\xff\"}");
        // GET with data= in the query.
        let data = b64(JSON.as_bytes());
        let r = EncodedRequest {
            query_data: Some(&data),
            ..req(b"")
        };
        assert_eq!(decode(&r, limit).unwrap(), JSON.as_bytes());
        // lz64 in a form.
        let lz = lz_str::compress_to_base64(JSON);
        let form = format!(
            "data={}&compression=lz64",
            form_urlencoded::byte_serialize(lz.as_bytes()).collect::<String>()
        );
        let r = EncodedRequest {
            content_type: Some("application/x-www-form-urlencoded"),
            ..req(form.as_bytes())
        };
        assert_eq!(decode(&r, limit).unwrap(), JSON.as_bytes());
        // Base64 of gzip.
        let data = b64(&gz);
        let r = EncodedRequest {
            query_compression: Some("base64"),
            ..req(data.as_bytes())
        };
        assert_eq!(decode(&r, limit).unwrap(), JSON.as_bytes());
    }

    #[test]
    fn broken_encodings_get_precise_errors() {
        let limit = 1 << 20;
        let r = EncodedRequest {
            query_compression: Some("zstd"),
            ..req(b"{}")
        };
        assert!(
            matches!(decode(&r, limit), Err(CaptureError::UnsupportedCompression(c)) if c == "zstd")
        );
        let r = EncodedRequest {
            query_compression: Some("base64"),
            ..req(b"!!!not base64")
        };
        assert!(matches!(
            decode(&r, limit),
            Err(CaptureError::InvalidBase64(_))
        ));
        let mut corrupt = gzip(JSON.as_bytes());
        corrupt.truncate(corrupt.len() / 2);
        assert!(matches!(
            decode(&req(&corrupt), limit),
            Err(CaptureError::InvalidGzip(_))
        ));
        let r = EncodedRequest {
            query_compression: Some("lz64"),
            ..req(b"@@@")
        };
        assert!(matches!(decode(&r, limit), Err(CaptureError::InvalidLz64)));
        let r = EncodedRequest {
            content_encoding: Some("br"),
            ..req(b"{}")
        };
        assert!(matches!(
            decode(&r, limit),
            Err(CaptureError::UnsupportedContentEncoding(_))
        ));
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit() {
        let bomb = gzip(&vec![b' '; 50 << 20]);
        assert!(bomb.len() < 100_000);
        let err = decode(&req(&bomb), 1 << 20).unwrap_err();
        assert!(matches!(err, CaptureError::DecompressedTooLarge { limit } if limit == 1 << 20));
    }
}
