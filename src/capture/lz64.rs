//! lz-string's `decompressFromBase64` (the `lz64` compression of very old posthog-js releases),
//! bounded: the output stops at a limit as it is produced, and the dictionary costs a few bytes
//! per entry whatever the entries' lengths.
//!
//! lz-string's dictionary entries are each a previous entry plus one character, so a hostile
//! input whose every code names the entry being added makes them grow by one each step: the
//! straightforward decoder (a string per entry, as the `lz-str` crate keeps them) then needs
//! memory quadratic in the input. Here each entry is a node (its prefix entry, its last unit, its
//! first unit and its length), so the dictionary is linear in the input, and an entry is spelled
//! out only when written to the output, which is capped. Its results are those of `lz-str` (the
//! tests compare the two on the SDK fixtures and on random inputs).

/// Why a payload could not be decompressed.
#[derive(Debug, PartialEq, Eq)]
pub enum Lz64Error {
    /// Not lz-string's base64 form (lz-str answers `None`).
    Invalid,
    /// The output would pass the limit, in UTF-16 units.
    TooLarge,
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
const NO_PARENT: u32 = u32::MAX;

/// A dictionary entry: `parent`'s units followed by `unit`.
#[derive(Clone, Copy)]
struct Node {
    parent: u32,
    unit: u16,
    first: u16,
    len: u32,
}

/// Reads the input's 6-bit values a bit at a time, lowest bit of each value first from its
/// highest position, as lz-string writes them.
struct Bits<I> {
    values: I,
    value: u16,
    position: u16,
}

impl<I: Iterator<Item = u16>> Bits<I> {
    fn new(mut values: I) -> Option<Bits<I>> {
        Some(Bits {
            value: values.next()?,
            values,
            position: 32,
        })
    }

    fn bit(&mut self) -> Option<bool> {
        let set = self.value & self.position != 0;
        self.position >>= 1;
        if self.position == 0 {
            self.position = 32;
            // As lz-string: running out of input right after a value's last bit is an error,
            // unless the stream was closed first.
            self.value = self.values.next()?;
        }
        Some(set)
    }

    fn read(&mut self, bits: u8) -> Option<u32> {
        let mut out = 0u32;
        for n in 0..bits.min(32) {
            out |= u32::from(self.bit()?) << n;
        }
        Some(out)
    }
}

/// Decompresses lz-string base64 into UTF-16 units, at most `max_units` of them.
pub fn decompress_from_base64(input: &str, max_units: usize) -> Result<Vec<u16>, Lz64Error> {
    decompress_reserving(input, max_units, &mut |_| true)
}

/// Output grows in steps of this many units, each reserved first.
const RESERVE_STEP: usize = 1 << 19;

/// [`decompress_from_base64`], asking `reserve(units)` before the output may grow by that many
/// more (the caller charges its memory budget); a refusal ends with [`Lz64Error::TooLarge`].
pub fn decompress_reserving(
    input: &str,
    max_units: usize,
    reserve: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<u16>, Lz64Error> {
    let mut reserved = 0usize;
    // Characters outside the alphabet are skipped, as lz-string does.
    let values = input
        .bytes()
        .filter_map(|b| ALPHABET.iter().position(|&k| k == b).map(|n| n as u16));
    let Some(mut bits) = Bits::new(values) else {
        return Ok(Vec::new());
    };
    let mut dictionary: Vec<Node> = Vec::with_capacity(64);
    for unit in 0..3 {
        // Placeholders for the three control codes; never looked up as entries.
        dictionary.push(Node {
            parent: NO_PARENT,
            unit,
            first: unit,
            len: 1,
        });
    }
    let literal = |bits: &mut Bits<_>, code: u32| -> Result<u16, Lz64Error> {
        let width = if code == 0 { 8 } else { 16 };
        bits.read(width).map(|v| v as u16).ok_or(Lz64Error::Invalid)
    };
    let first = match bits.read(2).ok_or(Lz64Error::Invalid)? {
        code @ (0 | 1) => literal(&mut bits, code)?,
        2 => return Ok(Vec::new()),
        _ => return Err(Lz64Error::Invalid),
    };
    dictionary.push(Node {
        parent: NO_PARENT,
        unit: first,
        first,
        len: 1,
    });
    let mut out: Vec<u16> = vec![first];
    let mut w = dictionary.len() as u32 - 1;
    let mut num_bits: u8 = 3;
    let mut enlarge_in: u64 = 4;
    loop {
        let mut code = bits.read(num_bits).ok_or(Lz64Error::Invalid)?;
        match code {
            0 | 1 => {
                let unit = literal(&mut bits, code)?;
                dictionary.push(Node {
                    parent: NO_PARENT,
                    unit,
                    first: unit,
                    len: 1,
                });
                code = dictionary.len() as u32 - 1;
                enlarge_in -= 1;
            }
            2 => return Ok(out),
            _ => {}
        }
        if enlarge_in == 0 {
            enlarge_in = 1 << num_bits;
            num_bits += 1;
        }
        let previous = dictionary[w as usize];
        // The entry to write; when the code names the entry about to be added (w + w[0]), it is
        // that entry, and adding "w + entry[0]" below adds it.
        let (entry, adds_itself) = match (code as usize).cmp(&dictionary.len()) {
            std::cmp::Ordering::Less => (dictionary[code as usize], false),
            std::cmp::Ordering::Equal => (
                Node {
                    parent: w,
                    unit: previous.first,
                    first: previous.first,
                    len: previous.len + 1,
                },
                true,
            ),
            std::cmp::Ordering::Greater => return Err(Lz64Error::Invalid),
        };
        let needed = out.len() + entry.len as usize;
        if needed > max_units {
            return Err(Lz64Error::TooLarge);
        }
        while needed > reserved {
            if !reserve(RESERVE_STEP) {
                return Err(Lz64Error::TooLarge);
            }
            reserved += RESERVE_STEP;
        }
        spell(&dictionary, entry, &mut out);
        dictionary.push(if adds_itself {
            entry
        } else {
            Node {
                parent: w,
                unit: entry.first,
                first: previous.first,
                len: previous.len + 1,
            }
        });
        enlarge_in -= 1;
        w = if adds_itself {
            dictionary.len() as u32 - 1
        } else {
            code
        };
        if enlarge_in == 0 {
            enlarge_in = 1 << num_bits;
            num_bits += 1;
        }
    }
}

/// Appends `node`'s units to `out`, walking its prefixes back from its last unit.
fn spell(dictionary: &[Node], node: Node, out: &mut Vec<u16>) {
    let start = out.len();
    out.resize(start + node.len as usize, 0);
    let mut at = start + node.len as usize;
    let mut current = node;
    loop {
        at -= 1;
        out[at] = current.unit;
        if current.parent == NO_PARENT || at == start {
            break;
        }
        current = dictionary[current.parent as usize];
    }
}

/// Inputs for tests of the decoder's bounds (unit tests here, and the HTTP tests in `tests/`).
#[doc(hidden)]
pub mod testing {
    use super::ALPHABET;

    /// Every code after the first names the entry being added, so each entry is one unit longer
    /// than the last: the output grows quadratically with the input.
    pub fn bomb(codes: usize) -> String {
        let mut bits: Vec<bool> = Vec::new();
        let push = |value: u32, width: u8, bits: &mut Vec<bool>| {
            for n in 0..width {
                bits.push(value >> n & 1 == 1);
            }
        };
        push(0, 2, &mut bits);
        push(u32::from(b'a'), 8, &mut bits);
        let (mut size, mut num_bits, mut enlarge_in) = (4u32, 3u8, 4u64);
        for _ in 0..codes {
            push(size, num_bits, &mut bits);
            size += 1;
            enlarge_in -= 1;
            if enlarge_in == 0 {
                enlarge_in = 1 << num_bits;
                num_bits += 1;
            }
        }
        push(2, num_bits, &mut bits);
        bits.chunks(6)
            .map(|chunk| {
                let value = chunk
                    .iter()
                    .enumerate()
                    .fold(0usize, |v, (i, b)| v | (usize::from(*b) << (5 - i)));
                ALPHABET[value] as char
            })
            .collect::<String>()
            + "A"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_as_the_crate(input: &str) {
        let theirs = lz_str::decompress_from_base64(input);
        let ours = decompress_from_base64(input, usize::MAX >> 1);
        match theirs {
            Some(units) => assert_eq!(ours, Ok(units), "input {input:?}"),
            None => assert_eq!(ours, Err(Lz64Error::Invalid), "input {input:?}"),
        }
    }

    #[test]
    fn round_trips_what_lz_string_compresses() {
        for text in [
            "",
            "a",
            "hello hello hello",
            r#"{"event":"$pageview","properties":{"distinct_id":"d","token":"phc_x","$current_url":"https://example.com/a?b=c"}}"#,
            "ünïcödé 🎉 and 日本語 text, repeated: ünïcödé 🎉 and 日本語",
        ] {
            let packed = lz_str::compress_to_base64(text);
            let units = decompress_from_base64(&packed, 1 << 20).unwrap();
            assert_eq!(String::from_utf16(&units).unwrap(), text);
            same_as_the_crate(&packed);
        }
    }

    /// Every recorded SDK payload, compressed by lz-string as old posthog-js did it, decodes to
    /// the same units as the crate gives.
    #[test]
    fn matches_the_crate_on_the_sdk_fixtures() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdk");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let fixture: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let payload = fixture["body_decoded"].to_string();
            let packed = lz_str::compress_to_base64(&payload);
            same_as_the_crate(&packed);
            let units = decompress_from_base64(&packed, payload.len()).unwrap();
            assert_eq!(
                String::from_utf16(&units).unwrap(),
                payload,
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert_eq!(seen, 43, "every recorded SDK request");
    }

    #[test]
    fn matches_the_crate_on_random_inputs() {
        let mut seed = 0x9E3779B97F4A7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..3000 {
            let len = (next() % 64) as usize;
            let input: String = if round % 2 == 0 {
                // Arbitrary characters of the alphabet: mostly invalid streams.
                (0..len)
                    .map(|_| ALPHABET[(next() % 65) as usize] as char)
                    .collect()
            } else {
                // Valid streams of random text, sometimes cut short.
                let text: String = (0..len)
                    .map(|_| char::from_u32((next() % 0x2FF) as u32 + 0x20).unwrap_or('x'))
                    .collect();
                let packed = lz_str::compress_to_base64(&text);
                let keep = if next() % 4 == 0 {
                    (next() as usize) % (packed.len() + 1)
                } else {
                    packed.len()
                };
                packed[..keep].to_owned()
            };
            same_as_the_crate(&input);
        }
    }

    #[test]
    fn a_quadratic_bomb_stops_at_the_limit_in_bounded_time() {
        let small = testing::bomb(200);
        same_as_the_crate(&small);
        let expected: usize = 1 + (2..=201).sum::<usize>();
        assert_eq!(
            decompress_from_base64(&small, 1 << 20).unwrap().len(),
            expected
        );
        // 20 KB of codes would spell out tens of gigabytes; it stops at 1 MiB of units.
        let big = testing::bomb(30_000);
        assert!(big.len() < 70_000, "{}", big.len());
        let started = std::time::Instant::now();
        assert_eq!(
            decompress_from_base64(&big, 1 << 20),
            Err(Lz64Error::TooLarge)
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
