//! A CBOR-aware mutator for `verify_signed_mutation`: edits the manifest as a value tree.
//!
//! libFuzzer's byte mutations mostly break CBOR framing (a string that grows by one byte no
//! longer matches its length prefix), so most of them die in the decoder. This mutator decodes
//! the manifest part of an input into a [`serde_cbor::Value`], changes one to three nodes (a
//! boundary integer, an unsafe path, a node copied from elsewhere in the tree, an array element
//! dropped or repeated) and encodes it again, which keeps the input a well-formed manifest most
//! of the time and lets the verifier's semantic checks see it. A share of calls still goes to
//! libFuzzer's own mutator so comparison-guided and dictionary mutations stay in play.

use serde_cbor::Value;

use crate::fixtures::{NOW, SEQUENCE_FLOOR};
use crate::mutation::{join_input, split_input, Edits};

/// libFuzzer's byte mutator, `(data, size, max_size) -> new size`, passed in so this module can be
/// tested without libFuzzer.
pub type ByteMutator<'a> = &'a mut dyn FnMut(&mut [u8], usize, usize) -> usize;

/// Integers at the edges of the manifest's rules: chunk size limits, `u32`/`u64` edges, the
/// verifier's clock and sequence floor, the payload path length limit.
const INTERESTING_INTEGERS: &[i128] = &[
    0,
    1,
    2,
    255,
    256,
    4095,
    4096,
    4097,
    10_000,
    65_535,
    65_536,
    1 << 20,
    (1 << 20) + 1,
    u32::MAX as i128,
    u32::MAX as i128 + 1,
    i64::MAX as i128,
    u64::MAX as i128,
    -1,
    i64::MIN as i128,
    NOW as i128 - 1,
    NOW as i128,
    NOW as i128 + 1,
    SEQUENCE_FLOOR as i128,
];

/// Strings the manifest's rules single out: unsafe and odd paths, the template file names, name
/// edge cases, semver edge cases and every enum spelling.
const INTERESTING_STRINGS: &[&str] = &[
    "",
    ".",
    "..",
    "../escape",
    "a/../../b",
    "/etc/passwd",
    "a//b",
    "./a",
    "a/",
    "c:\\x",
    "a\\b",
    "nul\0byte",
    "model.onnx",
    "tokenizer.json",
    "dir/model.onnx",
    "Bad Name",
    "-leading",
    "0",
    "1.2.3",
    "0.0.0-rc.1+build.5",
    "18446744073709551616.0.0",
    "raw",
    "embedding",
    "classification",
    "tract",
    "ort",
    "truncate",
    "reject",
    "mean",
    "cls",
    "none",
    "x86_64",
    "aarch64",
    "embeddings",
    "probabilities",
    "FP16",
    "FP32",
    "FP64",
    "INT8",
    "INT64",
    "UINT8",
    "BOOL",
    "BYTES",
];

/// Floats the self-test checks care about.
const INTERESTING_FLOATS: &[f64] = &[
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    -0.0,
    -1e-9,
    0.0,
    1e308,
    f64::MIN_POSITIVE,
];

/// Mutates the input in `data[..size]` in place and returns its new size (at most `max_size`).
pub fn mutate_input(
    data: &mut [u8],
    size: usize,
    max_size: usize,
    seed: u32,
    byte_mutate: ByteMutator<'_>,
) -> usize {
    let mut rng = Rng::new(seed);
    if rng.below(4) == 0 {
        return byte_mutate(data, size, max_size);
    }
    let Some((edits, manifest)) = split_input(&data[..size]) else {
        return byte_mutate(data, size, max_size);
    };
    if rng.below(6) == 0 {
        let edited = join_input(mutate_edits(edits, &mut rng), manifest);
        return write_back(data, &edited, max_size).unwrap_or(size);
    }
    let Ok(mut value) = serde_cbor::from_slice::<Value>(manifest) else {
        return byte_mutate(data, size, max_size);
    };

    for _ in 0..=rng.below(3) {
        mutate_value(&mut value, &mut rng, byte_mutate);
    }
    let Ok(encoded) = serde_cbor::to_vec(&value) else {
        return byte_mutate(data, size, max_size);
    };
    let edited = join_input(edits, &encoded);
    match write_back(data, &edited, max_size) {
        Some(new_size) => new_size,
        None => byte_mutate(data, size, max_size),
    }
}

/// Copies `edited` into `data` when it fits in both `data` and `max_size`.
fn write_back(data: &mut [u8], edited: &[u8], max_size: usize) -> Option<usize> {
    let fits = edited.len() <= max_size.min(data.len());
    if !fits {
        return None;
    }
    data[..edited.len()].copy_from_slice(edited);
    Some(edited.len())
}

fn mutate_edits(mut edits: Edits, rng: &mut Rng) -> Edits {
    match rng.below(3) {
        0 => edits.fix ^= 1 << rng.below(8),
        1 => edits.tamper ^= 1 << rng.below(8),
        _ => edits.at = rng.next() as u16,
    }
    edits
}

/// Applies one change at a randomly chosen node of `root`.
fn mutate_value(root: &mut Value, rng: &mut Rng, byte_mutate: ByteMutator<'_>) {
    let count = node_count(root);
    let target = rng.below(count);

    // One change in eight copies another subtree over the chosen node, which is how a raw model
    // grows text settings or a file list gains an entry that looks like the others.
    if rng.below(8) == 0 {
        let donor = nth_node(root, rng.below(count)).clone();
        *nth_node(root, target) = donor;
        return;
    }

    let node = nth_node(root, target);
    match node {
        Value::Integer(i) => *i = mutate_integer(*i, rng),
        Value::Text(s) => *s = mutate_text(s, rng, byte_mutate),
        Value::Bytes(b) => mutate_bytes(b, rng, byte_mutate),
        Value::Float(f) => *f = INTERESTING_FLOATS[rng.below(INTERESTING_FLOATS.len())],
        Value::Bool(b) => *b = !*b,
        Value::Array(items) => mutate_array(items, rng),
        Value::Map(map) => {
            if let Some(key) = map.keys().nth(rng.below(map.len().max(1))).cloned() {
                if rng.below(2) == 0 {
                    map.remove(&key);
                } else {
                    map.insert(key, Value::Null);
                }
            }
        }
        _ => *node = Value::Text(pick_string(rng).to_owned()),
    }
}

fn mutate_integer(i: i128, rng: &mut Rng) -> i128 {
    let candidate = match rng.below(4) {
        0 => i + 1,
        1 => i - 1,
        2 => i128::from(rng.next()),
        _ => INTERESTING_INTEGERS[rng.below(INTERESTING_INTEGERS.len())],
    };
    // CBOR integers span -2^64..2^64; stay inside what both i64 and u64 readers can meet.
    candidate.clamp(i128::from(i64::MIN), i128::from(u64::MAX))
}

fn mutate_text(s: &str, rng: &mut Rng, byte_mutate: ByteMutator<'_>) -> String {
    match rng.below(4) {
        0 => pick_string(rng).to_owned(),
        1 => format!("{s}/{}", pick_string(rng)),
        2 => "x".repeat(250 + rng.below(12)),
        _ => {
            let mut bytes = s.as_bytes().to_vec();
            byte_mutate_vec(&mut bytes, byte_mutate);
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }
}

fn mutate_bytes(b: &mut Vec<u8>, rng: &mut Rng, byte_mutate: ByteMutator<'_>) {
    match rng.below(3) {
        0 => b.truncate(b.len().saturating_sub(1)),
        1 => b.push(rng.next() as u8),
        _ => byte_mutate_vec(b, byte_mutate),
    }
}

/// Runs libFuzzer's byte mutator over `bytes`, with room to grow to twice the length plus 8.
fn byte_mutate_vec(bytes: &mut Vec<u8>, byte_mutate: ByteMutator<'_>) {
    let size = bytes.len();
    let max_size = size * 2 + 8;
    bytes.resize(max_size, 0);
    let new_size = byte_mutate(bytes, size, max_size);
    bytes.truncate(new_size);
}

fn mutate_array(items: &mut Vec<Value>, rng: &mut Rng) {
    if items.is_empty() {
        items.push(Value::Text(pick_string(rng).to_owned()));
        return;
    }
    let i = rng.below(items.len());
    match rng.below(4) {
        0 => {
            items.remove(i);
        }
        1 => items.insert(i, items[i].clone()),
        2 => {
            let j = rng.below(items.len());
            items.swap(i, j);
        }
        _ => items.clear(),
    }
}

fn pick_string(rng: &mut Rng) -> &'static str {
    INTERESTING_STRINGS[rng.below(INTERESTING_STRINGS.len())]
}

/// Nodes in `value`, itself included; map keys are not counted, since renaming a field only
/// meets `deny_unknown_fields`.
fn node_count(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(node_count).sum(),
        Value::Map(map) => map.values().map(node_count).sum(),
        Value::Tag(_, inner) => node_count(inner),
        _ => 0,
    }
}

/// The node at pre-order position `n` (modulo the node count).
fn nth_node(root: &mut Value, n: usize) -> &mut Value {
    let mut remaining = n % node_count(root);
    find_node(root, &mut remaining).expect("invariant: n is below the node count")
}

fn find_node<'v>(value: &'v mut Value, remaining: &mut usize) -> Option<&'v mut Value> {
    if *remaining == 0 {
        return Some(value);
    }
    *remaining -= 1;
    match value {
        Value::Array(items) => items.iter_mut().find_map(|v| find_node(v, remaining)),
        Value::Map(map) => map.values_mut().find_map(|v| find_node(v, remaining)),
        Value::Tag(_, inner) => find_node(inner, remaining),
        _ => None,
    }
}

/// SplitMix64: small, fast and good enough to choose mutations; seeded by libFuzzer so a run
/// can be replayed.
struct Rng(u64);

impl Rng {
    fn new(seed: u32) -> Self {
        Self(u64::from(seed) ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; 0 when `n` is 0.
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{embedding_template, signed_bundle};
    use flotilla_shared::Bundle;

    /// Stands in for libFuzzer's mutator: flips the first byte.
    fn flip_first(data: &mut [u8], size: usize, _max: usize) -> usize {
        if size > 0 {
            data[0] ^= 0xff;
        }
        size
    }

    fn seed_input() -> Vec<u8> {
        let (_, bundle) = signed_bundle(embedding_template());
        let manifest = Bundle::parse(&bundle).unwrap().manifest_bytes.to_vec();
        join_input(Edits::NONE, &manifest)
    }

    #[test]
    fn structured_mutations_mostly_keep_the_manifest_decodable_cbor() {
        let input = seed_input();
        let mut still_cbor = 0;
        let mut changed = 0;
        for seed in 0..500 {
            let mut data = input.clone();
            data.resize(input.len() * 2, 0);
            let max = data.len();
            let size = mutate_input(&mut data, input.len(), max, seed, &mut flip_first);
            assert!(size <= max);
            let mutated = &data[..size];
            changed += usize::from(mutated != input.as_slice());
            let (_, manifest) = split_input(mutated).unwrap_or((Edits::NONE, b""));
            still_cbor += usize::from(serde_cbor::from_slice::<Value>(manifest).is_ok());
        }
        assert!(
            changed > 450,
            "only {changed} of 500 mutations changed the input"
        );
        assert!(still_cbor > 300, "only {still_cbor} of 500 stayed CBOR");
    }

    #[test]
    fn an_input_that_would_outgrow_max_size_falls_back_to_the_byte_mutator() {
        let input = seed_input();
        for seed in 0..200 {
            let mut data = input.clone();
            let size = mutate_input(&mut data, input.len(), input.len(), seed, &mut flip_first);
            assert!(size <= input.len());
        }
    }

    #[test]
    fn nth_node_walks_every_node_in_pre_order() {
        let mut value = Value::Array(vec![
            Value::Integer(1),
            Value::Array(vec![Value::Integer(2)]),
        ]);
        assert_eq!(node_count(&value), 4);
        assert_eq!(*nth_node(&mut value, 3), Value::Integer(2));
        assert_eq!(*nth_node(&mut value, 5), Value::Integer(1));
    }
}
