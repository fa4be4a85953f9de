//! Triton's binary tensor data extension: tensor values as raw little-endian bytes after the
//! JSON header, whose length the `Inference-Header-Content-Length` header gives.
//!
//! Fixed-size types are packed row-major (`BOOL` one byte 0 or 1, `FP16` IEEE half); `BYTES`
//! elements are each a 4-byte little-endian length followed by that many bytes, which must be
//! UTF-8 here because text models take text.

use flotilla_shared::tensor::{element_count, DataType, Tensor, TensorData};

use super::error::ApiError;

/// Request and response header carrying the JSON header's length in bytes.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Bytes per element of a fixed-size datatype; `None` for `BYTES`.
fn element_size(datatype: DataType) -> Option<usize> {
    Some(match datatype {
        DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
        DataType::Fp16 => 2,
        DataType::Int32 | DataType::Fp32 => 4,
        DataType::Int64 | DataType::Fp64 => 8,
        DataType::Bytes => return None,
    })
}

/// Builds a tensor from its raw bytes.
pub fn decode(
    name: &str,
    datatype: DataType,
    shape: Vec<usize>,
    raw: &[u8],
) -> Result<Tensor, ApiError> {
    let bad = |reason: String| ApiError::BadRequest(format!("input {name:?}: {reason}"));
    let count = element_count(&shape).ok_or_else(|| bad("shape is too large".into()))?;

    let data = match element_size(datatype) {
        None => TensorData::Bytes(decode_strings(raw).map_err(bad)?),
        Some(size) => {
            if count.checked_mul(size) != Some(raw.len()) {
                return Err(bad(format!(
                    "shape {shape:?} of {datatype} needs {} bytes of binary data, got {}",
                    count.saturating_mul(size),
                    raw.len()
                )));
            }
            decode_fixed(datatype, raw).map_err(bad)?
        }
    };
    Tensor::new(name, shape, data).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn decode_fixed(datatype: DataType, raw: &[u8]) -> Result<TensorData, String> {
    fn chunks<const N: usize>(raw: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        raw.chunks_exact(N).map(|c| {
            c.try_into()
                .expect("invariant: chunks_exact yields N bytes")
        })
    }
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(
            raw.iter()
                .enumerate()
                .map(|(i, b)| match b {
                    0 => Ok(false),
                    1 => Ok(true),
                    _ => Err(format!("element {i} is byte {b}, not a BOOL 0 or 1")),
                })
                .collect::<Result<_, _>>()?,
        ),
        DataType::Uint8 => TensorData::Uint8(raw.to_vec()),
        DataType::Int8 => TensorData::Int8(chunks::<1>(raw).map(i8::from_le_bytes).collect()),
        DataType::Int32 => TensorData::Int32(chunks::<4>(raw).map(i32::from_le_bytes).collect()),
        DataType::Int64 => TensorData::Int64(chunks::<8>(raw).map(i64::from_le_bytes).collect()),
        DataType::Fp16 => TensorData::Fp16(
            chunks::<2>(raw)
                .map(|b| half::f16::from_le_bytes(b).to_f32())
                .collect(),
        ),
        DataType::Fp32 => TensorData::Fp32(chunks::<4>(raw).map(f32::from_le_bytes).collect()),
        DataType::Fp64 => TensorData::Fp64(chunks::<8>(raw).map(f64::from_le_bytes).collect()),
        DataType::Bytes => return Err("BYTES elements are length-prefixed, not fixed".into()),
    })
}

fn decode_strings(mut raw: &[u8]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let index = out.len();
        let Some((length, rest)) = raw.split_first_chunk::<4>() else {
            return Err(format!("element {index} has a truncated length prefix"));
        };
        let length = u32::from_le_bytes(*length) as usize;
        if rest.len() < length {
            return Err(format!(
                "element {index} claims {length} bytes, {} remain",
                rest.len()
            ));
        }
        let (value, rest) = rest.split_at(length);
        let text =
            std::str::from_utf8(value).map_err(|_| format!("element {index} is not UTF-8 text"))?;
        out.push(text.to_owned());
        raw = rest;
    }
    Ok(out)
}

/// A tensor's values as raw little-endian bytes.
pub fn encode(data: &TensorData) -> Vec<u8> {
    fn pack<T, const N: usize>(values: &[T], to_bytes: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(to_bytes).collect()
    }
    match data {
        TensorData::Bool(v) => v.iter().map(|b| u8::from(*b)).collect(),
        TensorData::Uint8(v) => v.clone(),
        TensorData::Int8(v) => pack(v, |x| x.to_le_bytes()),
        TensorData::Int32(v) => pack(v, |x| x.to_le_bytes()),
        TensorData::Int64(v) => pack(v, |x| x.to_le_bytes()),
        TensorData::Fp16(v) => pack(v, |x| half::f16::from_f32(*x).to_le_bytes()),
        TensorData::Fp32(v) => pack(v, |x| x.to_le_bytes()),
        TensorData::Fp64(v) => pack(v, |x| x.to_le_bytes()),
        TensorData::Bytes(v) => {
            let mut out = Vec::new();
            for text in v {
                // Strings longer than 4 GiB cannot come out of a body limited far below that.
                out.extend_from_slice(&(text.len() as u32).to_le_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_datatype_round_trips_through_bytes() {
        let cases = [
            (vec![2], TensorData::Bool(vec![true, false])),
            (vec![2], TensorData::Uint8(vec![0, 255])),
            (vec![2], TensorData::Int8(vec![-128, 127])),
            (vec![2], TensorData::Int32(vec![-1, i32::MAX])),
            (vec![2], TensorData::Int64(vec![i64::MIN, 7])),
            (vec![2], TensorData::Fp16(vec![0.5, -2.0])),
            (vec![1, 2], TensorData::Fp32(vec![1.5, -0.25])),
            (vec![2], TensorData::Fp64(vec![1e300, -0.0])),
            (
                vec![3],
                TensorData::Bytes(vec!["hi".into(), "".into(), "今天".into()]),
            ),
        ];
        for (shape, data) in cases {
            let raw = encode(&data);
            let back = decode("x", data.datatype(), shape, &raw).unwrap();
            assert_eq!(back.data, data);
        }
    }

    #[test]
    fn wrong_lengths_and_bad_text_are_client_errors() {
        let err = decode("x", DataType::Fp32, vec![1, 4], &[0; 15]).unwrap_err();
        assert!(err.to_string().contains("needs 16 bytes"), "{err}");

        let err = decode("t", DataType::Bytes, vec![1], &[5, 0, 0, 0, b'a']).unwrap_err();
        assert!(err.to_string().contains("claims 5 bytes"), "{err}");

        let err = decode("t", DataType::Bytes, vec![1], &[1, 0, 0, 0, 0xff]).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");

        let err = decode("t", DataType::Bytes, vec![2], &[0, 0, 0, 0]).unwrap_err();
        assert!(err.to_string().contains("holds 2 values but 1"), "{err}");

        let err = decode("b", DataType::Bool, vec![1], &[2]).unwrap_err();
        assert!(err.to_string().contains("not a BOOL"), "{err}");
    }
}
