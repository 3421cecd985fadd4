//! safetensors persistence of [`FlyHash`] encoders and [`BinaryIndex`]es.
//!
//! A file holds the tensors plus string metadata (`__metadata__`) with
//! `format` (`neuropil.FlyHash` / `neuropil.BinaryIndex`), `format_version`
//! and every constructor field. Saving goes through `flyhash::atomic` (a
//! temporary file renamed over the target), so a failed save never destroys
//! an old file. Loading checks every field: unknown or missing keys, wrong
//! dtypes/shapes, and (for encoders) that the stored projection is exactly the
//! one its seed generates; anything else is a `Format` error.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::atomic::write_atomic;
use super::projection::{sign_row_bytes, sparse_sign_bytes};
use super::{BinaryIndex, Config, FlyHash, Kind, Weights};
use crate::error::{Error, Result};

pub const FLYHASH_FORMAT: &str = "neuropil.FlyHash";
pub const INDEX_FORMAT: &str = "neuropil.BinaryIndex";
pub const FORMAT_VERSION: &str = "1";

fn fmt_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::format(format!("{}", path.display()), detail)
}

/// The safetensors bytes of `tensors`, with `meta` as the `__metadata__`
/// header in key order.
///
/// `safetensors::serialize` (0.7) takes the metadata as a `HashMap` and writes
/// it in that map's iteration order, which follows a per-process random seed:
/// the same object would give different bytes in every process. So the tensors
/// are serialized alone (their header entries come in a fixed order: dtype
/// alignment, then name) and the metadata object is put in front of them, as
/// `serialize` puts it, with the header padded with spaces to the 8-byte
/// multiple `serialize` pads to.
fn serialize(
    tensors: Vec<(&str, TensorView<'_>)>,
    meta: &BTreeMap<&str, String>,
) -> Result<Vec<u8>> {
    let bare = safetensors::serialize(tensors, None)
        .map_err(|e| Error::format("safetensors", e.to_string()))?;
    let malformed = || {
        Error::format(
            "safetensors",
            "unexpected header from safetensors::serialize",
        )
    };
    let n = bare
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(malformed)?;
    let header = n
        .checked_add(8)
        .and_then(|end| bare.get(8..end))
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(malformed)?;
    // `{}` or `{"name":{...},...}`, then padding
    let entries = header
        .trim_end_matches(' ')
        .strip_prefix('{')
        .ok_or_else(malformed)?;
    let mut json = String::from("{\"__metadata__\":{");
    for (i, (key, value)) in meta.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        push_json_string(&mut json, key);
        json.push(':');
        push_json_string(&mut json, value);
    }
    json.push('}');
    if entries != "}" {
        json.push(',');
    }
    json.push_str(entries);
    let padded = json.len().next_multiple_of(8);
    let mut out = Vec::with_capacity(8 + padded + bare.len() - 8 - n);
    out.extend_from_slice(&(padded as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(8 + padded, b' ');
    out.extend_from_slice(&bare[8 + n..]);
    Ok(out)
}

/// Appends `s` as a JSON string literal, escaped as `serde_json` escapes it.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn view<'a>(dtype: Dtype, shape: Vec<usize>, data: &'a [u8]) -> Result<TensorView<'a>> {
    TensorView::new(dtype, shape, data).map_err(|e| Error::format("safetensors", e.to_string()))
}

/// A file's bytes, with its header and metadata parsed.
struct Parsed {
    bytes: Vec<u8>,
    meta: HashMap<String, String>,
}

fn read(path: &Path, format: &str) -> Result<Parsed> {
    let bytes = std::fs::read(path).map_err(|e| Error::file("read", path, e))?;
    parse(bytes, path, format)
}

/// Parses the bytes of a file (`path` names them in errors: the file, or
/// what else they came from).
fn parse(bytes: Vec<u8>, path: &Path, format: &str) -> Result<Parsed> {
    let (_, md) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| fmt_err(path, format!("not a valid safetensors file ({e})")))?;
    SafeTensors::deserialize(&bytes)
        .map_err(|e| fmt_err(path, format!("not a valid safetensors file ({e})")))?;
    let meta = md
        .metadata()
        .clone()
        .ok_or_else(|| fmt_err(path, "no __metadata__ header"))?;
    let found = meta
        .get("format")
        .map(String::as_str)
        .unwrap_or("<missing>");
    if found != format {
        return Err(fmt_err(
            path,
            format!("format must be {format:?}; got {found:?}"),
        ));
    }
    let version = meta
        .get("format_version")
        .map(String::as_str)
        .unwrap_or("<missing>");
    if version != FORMAT_VERSION {
        // A later version says what to do (as the Python loaders say it).
        let newer = version.bytes().all(|b| b.is_ascii_digit())
            && !version.starts_with('0')
            && (version.len(), version) > (FORMAT_VERSION.len(), FORMAT_VERSION);
        let message = if newer {
            format!(
                "format_version {version} is newer than this neuropil ({}) reads (up to \
                 {FORMAT_VERSION}): upgrade neuropil",
                env!("CARGO_PKG_VERSION")
            )
        } else {
            format!("format_version must be {FORMAT_VERSION:?}; got {version:?}")
        };
        return Err(fmt_err(path, message));
    }
    Ok(Parsed { bytes, meta })
}

impl Parsed {
    fn field<T: std::str::FromStr>(&self, path: &Path, key: &str, what: &str) -> Result<T> {
        let raw = self
            .meta
            .get(key)
            .ok_or_else(|| fmt_err(path, format!("metadata field {key:?} is missing")))?;
        raw.parse().map_err(|_| {
            fmt_err(
                path,
                format!("metadata field {key:?} must be {what}; got {raw:?}"),
            )
        })
    }

    fn only_keys(&self, path: &Path, keys: &[&str]) -> Result<()> {
        let mut unknown: Vec<&String> = self
            .meta
            .keys()
            .filter(|k| !keys.contains(&k.as_str()))
            .collect();
        unknown.sort();
        if let Some(k) = unknown.first() {
            return Err(fmt_err(path, format!("unknown metadata field {k:?}")));
        }
        Ok(())
    }

    /// The tensor `name`, required to have `dtype` and `shape`.
    fn tensor(&self, path: &Path, name: &str, dtype: Dtype, shape: &[usize]) -> Result<Vec<u8>> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| fmt_err(path, e.to_string()))?;
        let t = st
            .tensor(name)
            .map_err(|_| fmt_err(path, format!("tensor {name:?} is missing")))?;
        if t.dtype() != dtype || t.shape() != shape {
            return Err(fmt_err(
                path,
                format!(
                    "tensor {name:?} must be {dtype:?} {shape:?}; got {:?} {:?}",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        Ok(t.data().to_vec())
    }

    fn tensor_names(&self, path: &Path) -> Result<Vec<String>> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| fmt_err(path, e.to_string()))?;
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        Ok(names)
    }
}

const FLYHASH_KEYS: [&str; 11] = [
    "format",
    "format_version",
    "input_dim",
    "expansion_ratio",
    "active_fraction",
    "seed",
    "projection",
    "connectivity",
    "binary",
    "output_dim",
    "active_bits",
];

/// Saves an encoder (its configuration and projection tensors).
pub fn save_flyhash(fh: &FlyHash, path: &Path) -> Result<()> {
    let c = &fh.config;
    let meta: BTreeMap<&str, String> = [
        ("format", FLYHASH_FORMAT.to_string()),
        ("format_version", FORMAT_VERSION.to_string()),
        ("input_dim", c.input_dim.to_string()),
        ("expansion_ratio", format!("{:?}", c.expansion_ratio)),
        ("active_fraction", format!("{:?}", c.active_fraction)),
        ("seed", c.seed.to_string()),
        ("projection", c.kind.name().to_string()),
        ("connectivity", format!("{:?}", c.connectivity)),
        ("binary", c.binary.to_string()),
        ("output_dim", fh.output_dim.to_string()),
        ("active_bits", fh.active_bits.to_string()),
    ]
    .into_iter()
    .collect();
    let m = fh.output_dim;
    let idx_bytes: Vec<u8>;
    let tensors = match &fh.weights {
        Weights::Sign(bits) => vec![("sign_bits", view(Dtype::U8, vec![m, bits.len() / m], bits)?)],
        Weights::Seeded => vec![],
        Weights::Sparse { c, plan, signs } => {
            idx_bytes = plan
                .row_major()
                .0
                .iter()
                .flat_map(|i| i.to_le_bytes())
                .collect();
            vec![
                ("indices", view(Dtype::U16, vec![m, *c], &idx_bytes)?),
                ("signs", view(Dtype::U8, vec![m, signs.len() / m], signs)?),
            ]
        }
    };
    write_atomic(path, &serialize(tensors, &meta)?)
}

/// Loads an encoder saved by [`save_flyhash`], validating every field.
pub fn load_flyhash(path: &Path) -> Result<FlyHash> {
    let p = read(path, FLYHASH_FORMAT)?;
    p.only_keys(path, &FLYHASH_KEYS)?;
    let proj: String = p.field(path, "projection", "sign, sparse or seeded")?;
    let kind = Kind::parse(&proj).ok_or_else(|| {
        fmt_err(
            path,
            format!("metadata field \"projection\" must be sign, sparse or seeded; got {proj:?}"),
        )
    })?;
    let config = Config {
        input_dim: p.field(path, "input_dim", "a positive integer")?,
        expansion_ratio: p.field(path, "expansion_ratio", "a number")?,
        active_fraction: p.field(path, "active_fraction", "a number")?,
        seed: p.field(path, "seed", "an unsigned 64-bit integer")?,
        kind,
        connectivity: p.field(path, "connectivity", "a number")?,
        binary: p.field(path, "binary", "true or false")?,
    };
    // Everything checked against the file before the projection is generated:
    // a few hundred tampered bytes must not make this build gigabytes.
    let (om, ok, c) =
        FlyHash::dims(&config).map_err(|e| fmt_err(path, format!("invalid configuration: {e}")))?;
    let m: usize = p.field(path, "output_dim", "a positive integer")?;
    let k: usize = p.field(path, "active_bits", "a positive integer")?;
    if (m, k) != (om, ok) {
        return Err(fmt_err(
            path,
            format!("output_dim/active_bits must be {om}/{ok} for this configuration; got {m}/{k}"),
        ));
    }
    let d = config.input_dim;
    let names = p.tensor_names(path)?;
    let want: &[&str] = match kind {
        Kind::Seeded => &[],
        Kind::Sign => &["sign_bits"],
        Kind::Sparse => &["indices", "signs"],
    };
    if names != want {
        return Err(fmt_err(
            path,
            if want.is_empty() {
                format!("a seeded projection stores no tensors; got {names:?}")
            } else {
                format!("tensors must be {want:?}; got {names:?}")
            },
        ));
    }
    let stored = match kind {
        Kind::Seeded => vec![],
        Kind::Sign => vec![p.tensor(path, "sign_bits", Dtype::U8, &[m, sign_row_bytes(d)])?],
        Kind::Sparse => vec![
            p.tensor(path, "indices", Dtype::U16, &[m, c])?,
            p.tensor(path, "signs", Dtype::U8, &[m, sparse_sign_bytes(c)])?,
        ],
    };
    let fh =
        FlyHash::new(config).map_err(|e| fmt_err(path, format!("invalid configuration: {e}")))?;
    let stored_matches = match (&fh.weights, stored.as_slice()) {
        (Weights::Seeded, []) => true,
        (Weights::Sign(bits), [sb]) => sb == bits,
        (Weights::Sparse { plan, signs, .. }, [idx, sg]) => {
            idx.chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .eq(plan.row_major().0)
                && sg == signs
        }
        _ => false,
    };
    if !stored_matches {
        return Err(fmt_err(
            path,
            "the stored projection differs from the one its seed generates (file altered or corrupt)",
        ));
    }
    Ok(fh)
}

const INDEX_KEYS: [&str; 5] = ["format", "format_version", "nbits", "count", "next_id"];

/// Saves an index (codes and ids).
pub fn save_index(ix: &BinaryIndex, path: &Path) -> Result<()> {
    write_atomic(path, &index_bytes(ix)?)
}

/// The bytes [`save_index`] writes: a safetensors file in memory (what a
/// pickled `neuropil.flyhash.BinaryIndex` carries).
pub fn index_bytes(ix: &BinaryIndex) -> Result<Vec<u8>> {
    let (codes, ids, next_id) = ix.parts();
    let meta: BTreeMap<&str, String> = [
        ("format", INDEX_FORMAT.to_string()),
        ("format_version", FORMAT_VERSION.to_string()),
        ("nbits", ix.nbits().to_string()),
        ("count", ix.len().to_string()),
        ("next_id", next_id.to_string()),
    ]
    .into_iter()
    .collect();
    let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let n = ix.len();
    let tensors = vec![
        ("codes", view(Dtype::U8, vec![n, ix.code_bytes()], codes)?),
        ("ids", view(Dtype::I64, vec![n], &id_bytes)?),
    ];
    serialize(tensors, &meta)
}

/// Loads an index saved by [`save_index`], validating every field.
pub fn load_index(path: &Path) -> Result<BinaryIndex> {
    index_from_parsed(read(path, INDEX_FORMAT)?, path)
}

/// An index from the bytes of [`index_bytes`], validated as [`load_index`]
/// validates a file; `origin` names them in errors.
pub fn index_from_bytes(bytes: Vec<u8>, origin: &str) -> Result<BinaryIndex> {
    let origin = Path::new(origin);
    index_from_parsed(parse(bytes, origin, INDEX_FORMAT)?, origin)
}

fn index_from_parsed(p: Parsed, path: &Path) -> Result<BinaryIndex> {
    p.only_keys(path, &INDEX_KEYS)?;
    let nbits: usize = p.field(path, "nbits", "a positive integer")?;
    let n: usize = p.field(path, "count", "a non-negative integer")?;
    let next_id: i64 = p.field(path, "next_id", "a non-negative integer")?;
    let names = p.tensor_names(path)?;
    if names != ["codes", "ids"] {
        return Err(fmt_err(
            path,
            format!("tensors must be [\"codes\", \"ids\"]; got {names:?}"),
        ));
    }
    if nbits == 0 || nbits > (1 << 30) {
        return Err(fmt_err(
            path,
            format!("metadata field \"nbits\" must be in [1, 2^30]; got {nbits}"),
        ));
    }
    let codes = p.tensor(path, "codes", Dtype::U8, &[n, nbits.div_ceil(8)])?;
    let ids: Vec<i64> = p
        .tensor(path, "ids", Dtype::I64, &[n])?
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .collect();
    if next_id < 0 {
        return Err(fmt_err(
            path,
            format!("metadata field \"next_id\" must be >= 0; got {next_id}"),
        ));
    }
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i >= next_id) {
        return Err(fmt_err(
            path,
            format!("ids must lie in [0, next_id={next_id}); got {bad}"),
        ));
    }
    BinaryIndex::from_parts(nbits, codes, ids, next_id).map_err(|e| fmt_err(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: Kind) -> Config {
        Config {
            input_dim: 40,
            expansion_ratio: 5.0,
            active_fraction: 0.1,
            seed: 11,
            kind,
            connectivity: 0.2,
            binary: false,
        }
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let dir = std::env::temp_dir().join(format!("neuropil-flyhash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for kind in [Kind::Sign, Kind::Sparse, Kind::Seeded] {
            let fh = FlyHash::new(cfg(kind)).unwrap();
            let path = dir.join(format!("{}.safetensors", kind.name()));
            save_flyhash(&fh, &path).unwrap();
            let back = load_flyhash(&path).unwrap();
            assert_eq!(back.weights, fh.weights);
            assert_eq!(back.config, fh.config);
            if kind != Kind::Seeded {
                let mut bytes = std::fs::read(&path).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                std::fs::write(&path, &bytes).unwrap();
                let err = load_flyhash(&path).unwrap_err().to_string();
                assert!(
                    err.contains("differs from the one its seed generates"),
                    "{err}"
                );
                std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
                assert!(matches!(load_flyhash(&path), Err(Error::Format { .. })));
            }
        }
        let mut ix = BinaryIndex::new(20).unwrap();
        ix.add(&[1, 2, 3, 4, 5, 6], 2, None).unwrap();
        let path = dir.join("ix.safetensors");
        save_index(&ix, &path).unwrap();
        let back = load_index(&path).unwrap();
        assert_eq!(back.parts(), ix.parts());
        assert!(matches!(load_flyhash(&path), Err(Error::Format { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn saved_bytes_do_not_depend_on_hash_map_order() {
        // Every `HashMap` draws its own hash keys, so two saves of one object
        // in one process already ordered the metadata differently.
        let fh = FlyHash::new(cfg(Kind::Sparse)).unwrap();
        let dir = std::env::temp_dir().join(format!("neuropil-fhdet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fh.safetensors");
        let mut saved = Vec::new();
        for _ in 0..8 {
            save_flyhash(&fh, &path).unwrap();
            saved.push(std::fs::read(&path).unwrap());
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(saved.iter().all(|b| *b == saved[0]));
        let mut ix = BinaryIndex::new(20).unwrap();
        ix.add(&[1, 2, 3, 4, 5, 6], 2, None).unwrap();
        let first = index_bytes(&ix).unwrap();
        assert!((0..8).all(|_| index_bytes(&ix).unwrap() == first));
        // Keys sorted, the layout safetensors reads.
        let (n, md) = SafeTensors::read_metadata(&first).unwrap();
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&first[8..8 + n]).unwrap();
        assert!(header.starts_with(
            r#"{"__metadata__":{"count":"2","format":"neuropil.BinaryIndex","format_version":"1","nbits":"20","next_id":"2"},"#
        ), "{header}");
        assert_eq!(md.metadata().as_ref().unwrap().len(), 5);
    }

    #[test]
    fn serialize_writes_what_safetensors_writes_for_one_key() {
        // With a single metadata key there is no order to differ: the bytes
        // must be the crate's own, padding included, for every header length,
        // tensors or none, and escaped strings must read back unchanged.
        let data = [7u8; 24];
        for value in ["", "a", "ab\"c\\d\n\u{1}é", "0123456789abcdef"] {
            for with_tensors in [false, true] {
                let tensors = || {
                    if with_tensors {
                        vec![
                            ("b", view(Dtype::U8, vec![8], &data[..8]).unwrap()),
                            ("a", view(Dtype::I64, vec![2], &data[8..]).unwrap()),
                        ]
                    } else {
                        vec![]
                    }
                };
                let ours =
                    serialize(tensors(), &BTreeMap::from([("k", value.to_string())])).unwrap();
                let theirs = safetensors::serialize(
                    tensors(),
                    Some(HashMap::from([("k".to_string(), value.to_string())])),
                )
                .unwrap();
                assert_eq!(ours, theirs, "{value:?} {with_tensors}");
                let (_, md) = SafeTensors::read_metadata(&ours).unwrap();
                assert_eq!(md.metadata().as_ref().unwrap()["k"], value);
            }
        }
    }

    #[test]
    fn index_bytes_round_trip_and_validation() {
        let mut ix = BinaryIndex::new(20).unwrap();
        ix.add(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 3, Some(&[7, 3, 11]))
            .unwrap();
        assert_eq!(ix.remove(&[3]), 1);
        let bytes = index_bytes(&ix).unwrap();
        let back = index_from_bytes(bytes.clone(), "state").unwrap();
        assert_eq!(back.parts(), ix.parts());
        assert_eq!(back.nbits(), 20);
        // Truncated, altered (a bit past nbits set) or of another format: Format errors.
        let err = index_from_bytes(bytes[..bytes.len() - 3].to_vec(), "state").unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        // next_id 12 -> 01: the stored ids 7 and 11 no longer lie below it.
        let at = bytes
            .windows(14)
            .position(|w| w == b"\"next_id\":\"12\"")
            .unwrap();
        let mut bad = bytes.clone();
        bad[at + 11..at + 13].copy_from_slice(b"01");
        let err = index_from_bytes(bad, "state").unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert!(err.to_string().contains("state"), "{err}");
        let fh_bytes = {
            let dir = std::env::temp_dir().join(format!("neuropil-fhb-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("fh.safetensors");
            save_flyhash(&FlyHash::new(cfg(Kind::Seeded)).unwrap(), &path).unwrap();
            let b = std::fs::read(&path).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            b
        };
        assert!(matches!(
            index_from_bytes(fh_bytes, "state"),
            Err(Error::Format { .. })
        ));
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("neuropil-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_tampered_encoder_is_refused_before_its_projection_is_generated() {
        // Metadata claiming a 2 GB projection, consistent with itself, over
        // the small stored tensor: a shape error, with nothing generated.
        let dir = scratch("fhbig");
        let path = dir.join("fh.st");
        let fh = FlyHash::new(cfg(Kind::Sign)).unwrap();
        let meta: BTreeMap<&str, String> = [
            ("format", FLYHASH_FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("input_dim", "4096".to_string()),
            ("expansion_ratio", "1000.0".to_string()),
            ("active_fraction", "0.1".to_string()),
            ("seed", "11".to_string()),
            ("projection", "sign".to_string()),
            ("connectivity", "0.2".to_string()),
            ("binary", "false".to_string()),
            ("output_dim", "4096000".to_string()),
            ("active_bits", "409600".to_string()),
        ]
        .into_iter()
        .collect();
        let Weights::Sign(bits) = &fh.weights else {
            unreachable!()
        };
        let m = fh.output_dim;
        let t = vec![(
            "sign_bits",
            view(Dtype::U8, vec![m, bits.len() / m], bits).unwrap(),
        )];
        std::fs::write(&path, serialize(t, &meta).unwrap()).unwrap();
        let err = load_flyhash(&path).unwrap_err().to_string();
        assert!(err.contains("tensor \"sign_bits\" must be"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
