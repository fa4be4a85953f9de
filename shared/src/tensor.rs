//! Tensors as they cross process boundaries: datatypes, shapes with symbolic dimensions, values.
//!
//! Names and datatypes follow the Open Inference Protocol v2, so the same types describe a
//! bundle's model signature, its self-test vectors and the agent's `/v2/.../infer` bodies.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An element type, named as in the Open Inference Protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataType {
    /// Boolean.
    Bool,
    /// Unsigned 8-bit integer.
    Uint8,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer.
    Int64,
    /// IEEE half precision; carried as `f32` values and narrowed when a model runs.
    Fp16,
    /// IEEE single precision.
    Fp32,
    /// IEEE double precision.
    Fp64,
    /// Variable-length strings (UTF-8 text for text models).
    Bytes,
}

impl DataType {
    /// The protocol name, e.g. `FP32`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::Uint8 => "UINT8",
            Self::Int8 => "INT8",
            Self::Int32 => "INT32",
            Self::Int64 => "INT64",
            Self::Fp16 => "FP16",
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One dimension of a declared shape: a fixed size or a named symbol such as `batch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(u64),
    /// A size chosen per request; the name ties equal dimensions together (`?` when unnamed).
    Symbol(String),
}

impl Dim {
    /// Whether a concrete size fits this dimension.
    pub fn admits(&self, size: usize) -> bool {
        match self {
            Self::Fixed(n) => *n == size as u64,
            Self::Symbol(_) => true,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Symbol(s) => f.write_str(s),
        }
    }
}

/// A named model input or output: its datatype and declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// The ONNX graph name.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Declared shape; symbolic dimensions vary per request.
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// The shape written as `[batch, sequence, 32]`.
    pub fn shape_string(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(Dim::to_string).collect();
        format!("[{}]", dims.join(", "))
    }

    /// Whether a concrete shape matches the declared rank and fixed sizes.
    pub fn admits_shape(&self, shape: &[usize]) -> bool {
        self.shape.len() == shape.len() && self.shape.iter().zip(shape).all(|(d, s)| d.admits(*s))
    }
}

/// The values of a tensor, flattened in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// `BOOL`.
    Bool(Vec<bool>),
    /// `UINT8`.
    Uint8(Vec<u8>),
    /// `INT8`.
    Int8(Vec<i8>),
    /// `INT32`.
    Int32(Vec<i32>),
    /// `INT64`.
    Int64(Vec<i64>),
    /// `FP16`, held as `f32`.
    Fp16(Vec<f32>),
    /// `FP32`.
    Fp32(Vec<f32>),
    /// `FP64`.
    Fp64(Vec<f64>),
    /// `BYTES`, held as UTF-8 strings.
    Bytes(Vec<String>),
}

impl TensorData {
    /// The datatype these values carry.
    pub fn datatype(&self) -> DataType {
        match self {
            Self::Bool(_) => DataType::Bool,
            Self::Uint8(_) => DataType::Uint8,
            Self::Int8(_) => DataType::Int8,
            Self::Int32(_) => DataType::Int32,
            Self::Int64(_) => DataType::Int64,
            Self::Fp16(_) => DataType::Fp16,
            Self::Fp32(_) => DataType::Fp32,
            Self::Fp64(_) => DataType::Fp64,
            Self::Bytes(_) => DataType::Bytes,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::Bool(v) => v.len(),
            Self::Uint8(v) => v.len(),
            Self::Int8(v) => v.len(),
            Self::Int32(v) => v.len(),
            Self::Int64(v) => v.len(),
            Self::Fp16(v) | Self::Fp32(v) => v.len(),
            Self::Fp64(v) => v.len(),
            Self::Bytes(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Numeric values widened to `f64`, for comparisons with a tolerance; `None` for text.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        Some(match self {
            Self::Bool(v) => v.iter().map(|b| f64::from(u8::from(*b))).collect(),
            Self::Uint8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Self::Int8(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Self::Int32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            // Precision loss above 2^53 is acceptable: this feeds tolerance checks only.
            Self::Int64(v) => v.iter().map(|x| *x as f64).collect(),
            Self::Fp16(v) | Self::Fp32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Self::Fp64(v) => v.clone(),
            Self::Bytes(_) => return None,
        })
    }
}

/// A named tensor with a concrete shape and its values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireTensor", into = "WireTensor")]
pub struct Tensor {
    /// Input or output name.
    pub name: String,
    /// Concrete shape; the product of its dimensions equals the number of values.
    pub shape: Vec<usize>,
    /// The values.
    pub data: TensorData,
}

impl Tensor {
    /// Builds a tensor, checking that the shape and the number of values agree.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        data: TensorData,
    ) -> Result<Self, TensorError> {
        let name = name.into();
        let expected = element_count(&shape)
            .ok_or_else(|| TensorError::ShapeOverflow { name: name.clone() })?;
        if expected != data.len() {
            return Err(TensorError::ShapeMismatch {
                name,
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { name, shape, data })
    }

    /// The datatype of the values.
    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }

    /// Largest absolute difference to `other`, or why the two cannot be compared.
    pub fn max_abs_diff(&self, other: &Tensor) -> Result<f64, TensorError> {
        if self.shape != other.shape {
            return Err(TensorError::Incomparable {
                name: self.name.clone(),
                reason: format!("shape {:?} against {:?}", self.shape, other.shape),
            });
        }
        let (Some(a), Some(b)) = (self.data.to_f64(), other.data.to_f64()) else {
            let equal = self.data == other.data;
            return Ok(if equal { 0.0 } else { f64::INFINITY });
        };
        Ok(a.iter()
            .zip(&b)
            .map(|(x, y)| {
                if x.is_nan() || y.is_nan() {
                    f64::INFINITY
                } else {
                    (x - y).abs()
                }
            })
            .fold(0.0, f64::max))
    }
}

/// The product of the dimensions, or `None` on overflow.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d))
}

/// Why values do not form a valid tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    /// The values do not fill the shape.
    #[error("tensor {name:?}: shape {shape:?} holds {expected} values but {actual} were given")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Declared shape.
        shape: Vec<usize>,
        /// Values the shape holds.
        expected: usize,
        /// Values given.
        actual: usize,
    },
    /// The shape's element count does not fit in memory.
    #[error("tensor {name:?}: shape is too large")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
    },
    /// A value does not fit the datatype.
    #[error("tensor {name:?}: element {index} is not a valid {datatype} value")]
    BadElement {
        /// Tensor name.
        name: String,
        /// Position in the flattened data.
        index: usize,
        /// Declared datatype.
        datatype: DataType,
    },
    /// Two tensors cannot be compared.
    #[error("tensor {name:?}: cannot compare {reason}")]
    Incomparable {
        /// Tensor name.
        name: String,
        /// What differs.
        reason: String,
    },
}

/// A value as it appears in JSON, CBOR or TOML before the datatype gives it meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
    /// Nested row-major arrays are accepted and flattened, as the protocol allows.
    List(Vec<Scalar>),
}

/// The protocol's tensor object: `{name, datatype, shape, data}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTensor {
    name: String,
    datatype: DataType,
    shape: Vec<usize>,
    data: Vec<Scalar>,
}

impl From<Tensor> for WireTensor {
    fn from(t: Tensor) -> Self {
        let datatype = t.datatype();
        let data = match t.data {
            TensorData::Bool(v) => v.into_iter().map(Scalar::Bool).collect(),
            TensorData::Uint8(v) => v.into_iter().map(|x| Scalar::Int(x.into())).collect(),
            TensorData::Int8(v) => v.into_iter().map(|x| Scalar::Int(x.into())).collect(),
            TensorData::Int32(v) => v.into_iter().map(|x| Scalar::Int(x.into())).collect(),
            TensorData::Int64(v) => v.into_iter().map(Scalar::Int).collect(),
            TensorData::Fp16(v) | TensorData::Fp32(v) => {
                v.into_iter().map(|x| Scalar::Float(x.into())).collect()
            }
            TensorData::Fp64(v) => v.into_iter().map(Scalar::Float).collect(),
            TensorData::Bytes(v) => v.into_iter().map(Scalar::Text).collect(),
        };
        Self {
            name: t.name,
            datatype,
            shape: t.shape,
            data,
        }
    }
}

impl TryFrom<WireTensor> for Tensor {
    type Error = TensorError;

    fn try_from(w: WireTensor) -> Result<Self, Self::Error> {
        let mut flat = Vec::with_capacity(w.data.len());
        flatten(w.data, &mut flat);
        let data = typed_data(&w.name, w.datatype, flat)?;
        Tensor::new(w.name, w.shape, data)
    }
}

fn flatten(values: Vec<Scalar>, out: &mut Vec<Scalar>) {
    for v in values {
        match v {
            Scalar::List(inner) => flatten(inner, out),
            other => out.push(other),
        }
    }
}

fn typed_data(
    name: &str,
    datatype: DataType,
    flat: Vec<Scalar>,
) -> Result<TensorData, TensorError> {
    let bad = |index| TensorError::BadElement {
        name: name.to_owned(),
        index,
        datatype,
    };
    fn collect<T>(
        flat: Vec<Scalar>,
        bad: impl Fn(usize) -> TensorError,
        convert: impl Fn(Scalar) -> Option<T>,
    ) -> Result<Vec<T>, TensorError> {
        flat.into_iter()
            .enumerate()
            .map(|(i, s)| convert(s).ok_or_else(|| bad(i)))
            .collect()
    }
    let int = |s: Scalar| -> Option<i64> {
        match s {
            Scalar::Int(i) => Some(i),
            Scalar::UInt(u) => i64::try_from(u).ok(),
            Scalar::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
            _ => None,
        }
    };
    let float = |s: Scalar| -> Option<f64> {
        match s {
            Scalar::Int(i) => Some(i as f64),
            Scalar::UInt(u) => Some(u as f64),
            Scalar::Float(f) => Some(f),
            _ => None,
        }
    };
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(collect(flat, bad, |s| match s {
            Scalar::Bool(b) => Some(b),
            Scalar::Int(0) => Some(false),
            Scalar::Int(1) => Some(true),
            _ => None,
        })?),
        DataType::Uint8 => TensorData::Uint8(collect(flat, bad, |s| {
            int(s).and_then(|i| u8::try_from(i).ok())
        })?),
        DataType::Int8 => TensorData::Int8(collect(flat, bad, |s| {
            int(s).and_then(|i| i8::try_from(i).ok())
        })?),
        DataType::Int32 => TensorData::Int32(collect(flat, bad, |s| {
            int(s).and_then(|i| i32::try_from(i).ok())
        })?),
        DataType::Int64 => TensorData::Int64(collect(flat, bad, int)?),
        // Narrowing to f32 is the point of these datatypes; out-of-range values become infinite.
        DataType::Fp16 => TensorData::Fp16(collect(flat, bad, |s| float(s).map(|f| f as f32))?),
        DataType::Fp32 => TensorData::Fp32(collect(flat, bad, |s| float(s).map(|f| f as f32))?),
        DataType::Fp64 => TensorData::Fp64(collect(flat, bad, float)?),
        DataType::Bytes => TensorData::Bytes(collect(flat, bad, |s| match s {
            Scalar::Text(t) => Some(t),
            _ => None,
        })?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_tensor_round_trips_with_nested_data() {
        let json = r#"{"name":"x","datatype":"FP32","shape":[2,2],"data":[[1,2.5],[3,4]]}"#;
        let t: Tensor = serde_json::from_str(json).unwrap();
        assert_eq!(t.data, TensorData::Fp32(vec![1.0, 2.5, 3.0, 4.0]));
        let back: Tensor = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn wrong_element_count_is_rejected() {
        let json = r#"{"name":"x","datatype":"INT64","shape":[3],"data":[1,2]}"#;
        let err = serde_json::from_str::<Tensor>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds 3 values but 2 were given"), "{err}");
    }

    #[test]
    fn values_outside_the_datatype_are_rejected() {
        for json in [
            r#"{"name":"x","datatype":"INT8","shape":[1],"data":[300]}"#,
            r#"{"name":"x","datatype":"INT64","shape":[1],"data":[1.5]}"#,
            r#"{"name":"x","datatype":"FP32","shape":[1],"data":["one"]}"#,
            r#"{"name":"x","datatype":"BYTES","shape":[1],"data":[1]}"#,
        ] {
            let err = serde_json::from_str::<Tensor>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains("element 0 is not a valid"), "{json}: {err}");
        }
    }

    #[test]
    fn max_abs_diff_compares_values_and_refuses_other_shapes() {
        let a = Tensor::new("y", vec![2], TensorData::Fp32(vec![1.0, 2.0])).unwrap();
        let b = Tensor::new("y", vec![2], TensorData::Fp32(vec![1.0, 2.5])).unwrap();
        assert_eq!(a.max_abs_diff(&b).unwrap(), 0.5);
        let c = Tensor::new("y", vec![1, 2], TensorData::Fp32(vec![1.0, 2.0])).unwrap();
        assert!(a.max_abs_diff(&c).is_err());
        let nan = Tensor::new("y", vec![2], TensorData::Fp32(vec![f32::NAN, 2.0])).unwrap();
        assert_eq!(a.max_abs_diff(&nan).unwrap(), f64::INFINITY);
    }

    #[test]
    fn symbolic_dims_admit_any_size() {
        let spec = TensorSpec {
            name: "input_ids".into(),
            datatype: DataType::Int64,
            shape: vec![Dim::Symbol("batch".into()), Dim::Fixed(8)],
        };
        assert!(spec.admits_shape(&[3, 8]));
        assert!(!spec.admits_shape(&[3, 9]));
        assert!(!spec.admits_shape(&[8]));
        assert_eq!(spec.shape_string(), "[batch, 8]");
    }
}
