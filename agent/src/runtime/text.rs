//! Text models: HuggingFace tokenisation in, pooled embeddings or class probabilities out.

use std::path::Path;
use std::sync::Arc;

use flotilla_shared::manifest::{text_output_name, ModelMeta, Pooling, Task, TextMeta, Truncation};
use flotilla_shared::tensor::{DataType, Tensor, TensorData, TensorSpec};
use tokenizers::{Encoding, Tokenizer, TruncationParams};
use tract_linalg::multithread::Executor;

use super::{pool, RuntimeError};

/// Inputs a BERT-family graph may take, all filled from the tokenizer.
const TEXT_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

/// Requests of several texts with at least this many bytes in all are tokenised in parallel on
/// the CPU pool: a few hundred microseconds of work, well above the cost of waking the pool.
const PARALLEL_TOKENIZE_BYTES: usize = 2048;

/// A tokenizer configured by the bundle's text settings.
pub struct TextPipeline {
    tokenizer: Tokenizer,
    settings: TextMeta,
    pad_id: u32,
    /// Where large requests are tokenised; `None` on a one-thread budget.
    pool: Option<Arc<rayon::ThreadPool>>,
}

/// One tokenised batch, unpadded.
#[derive(Debug, Clone, PartialEq)]
pub struct TextBatch {
    /// Token ids per text, special tokens included.
    pub ids: Vec<Vec<u32>>,
    /// Segment ids per text.
    pub type_ids: Vec<Vec<u32>>,
    /// Token strings per text.
    pub tokens: Vec<Vec<String>>,
    /// Byte offsets of each token in its text.
    pub offsets: Vec<Vec<(usize, usize)>>,
    /// Whether each text was cut to the model's maximum length.
    pub truncated: Vec<bool>,
}

impl TextBatch {
    /// Number of texts.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Longest token sequence in the batch; the padded width.
    pub fn width(&self) -> usize {
        self.ids.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Total tokens, without padding.
    pub fn token_count(&self) -> usize {
        self.ids.iter().map(Vec::len).sum()
    }
}

impl TextPipeline {
    /// Loads the bundle's tokenizer and checks the graph takes only tokenizer-fed inputs; large
    /// requests will be tokenised on the process's CPU pool of `threads` threads (0: one per
    /// core; see `pool::shared`).
    pub fn load(
        dir: &Path,
        meta: &ModelMeta,
        settings: &TextMeta,
        threads: usize,
    ) -> Result<Self, RuntimeError> {
        let path = dir.join(&settings.tokenizer);
        let fail = |reason: String| RuntimeError::LoadTokenizer {
            path: path.clone(),
            reason,
        };
        let pool = match pool::shared(threads)? {
            Executor::MultiThread(pool) => Some(pool),
            // One thread (the shared pool is never rayon's global one).
            _ => None,
        };
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| fail(e.to_string()))?;

        // Padding is done per batch here; truncation follows the bundle, letting the tokenizer
        // keep its closing special tokens.
        tokenizer.with_padding(None);
        let truncation = match settings.truncation {
            Truncation::Truncate => Some(TruncationParams {
                max_length: settings.max_sequence_length as usize,
                ..Default::default()
            }),
            Truncation::Reject => None,
        };
        tokenizer
            .with_truncation(truncation)
            .map_err(|e| fail(e.to_string()))?;
        let pad_id = tokenizer.token_to_id("[PAD]").unwrap_or(0);

        for input in &meta.inputs {
            let fed = TEXT_INPUTS.contains(&input.name.as_str());
            let integer = matches!(input.datatype, DataType::Int64 | DataType::Int32);
            if !fed || !integer || input.shape.len() != 2 {
                return Err(RuntimeError::Signature(format!(
                    "text model input {:?} {} {} is not one the tokenizer can fill \
                     (INT64 or INT32 [batch, sequence] named {})",
                    input.name,
                    input.datatype,
                    input.shape_string(),
                    TEXT_INPUTS.join(", ")
                )));
            }
        }
        if !meta.inputs.iter().any(|i| i.name == "input_ids") {
            return Err(RuntimeError::Signature(
                "text model takes no input_ids".into(),
            ));
        }
        if !meta.outputs.iter().any(|o| o.name == settings.output) {
            return Err(RuntimeError::Signature(format!(
                "text output {:?} is not a model output",
                settings.output
            )));
        }
        Ok(Self {
            tokenizer,
            settings: settings.clone(),
            pad_id,
            pool,
        })
    }

    /// The bundle's text settings.
    pub fn settings(&self) -> &TextMeta {
        &self.settings
    }

    /// Tokenises texts, applying the bundle's truncation policy.
    pub fn encode(&self, texts: &[String]) -> Result<TextBatch, RuntimeError> {
        if texts.is_empty() {
            return Err(RuntimeError::EmptyBatch);
        }
        let max = self.settings.max_sequence_length as usize;
        let mut batch = TextBatch {
            ids: Vec::with_capacity(texts.len()),
            type_ids: Vec::with_capacity(texts.len()),
            tokens: Vec::with_capacity(texts.len()),
            offsets: Vec::with_capacity(texts.len()),
            truncated: Vec::with_capacity(texts.len()),
        };
        for (index, encoding) in self.tokenize(texts)?.into_iter().enumerate() {
            if encoding.len() > max {
                return Err(RuntimeError::TextTooLong {
                    index,
                    tokens: encoding.len(),
                    max,
                });
            }
            batch.truncated.push(!encoding.get_overflowing().is_empty());
            batch.ids.push(encoding.get_ids().to_vec());
            batch.type_ids.push(encoding.get_type_ids().to_vec());
            batch.tokens.push(encoding.get_tokens().to_vec());
            batch.offsets.push(encoding.get_offsets().to_vec());
        }
        Ok(batch)
    }

    /// Each text's encoding, in order: in parallel on the CPU pool when the request is large
    /// enough to gain from it, else one after another on the calling thread.
    fn tokenize(&self, texts: &[String]) -> Result<Vec<Encoding>, RuntimeError> {
        let bytes: usize = texts.iter().map(String::len).sum();
        let encoded = match &self.pool {
            Some(pool) if texts.len() > 1 && bytes >= PARALLEL_TOKENIZE_BYTES => {
                let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
                pool.install(|| self.tokenizer.encode_batch(inputs, true))
            }
            _ => texts
                .iter()
                .map(|text| self.tokenizer.encode(text.as_str(), true))
                .collect(),
        };
        encoded.map_err(|e| RuntimeError::Tokenize(e.to_string()))
    }

    /// Pads the batch to its widest text and builds the graph's inputs in declared order.
    pub fn model_inputs(
        &self,
        batch: &TextBatch,
        specs: &[TensorSpec],
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let (rows, width) = (batch.len(), batch.width());
        let padded = |source: &[Vec<u32>], fill: u32| -> Vec<i64> {
            let mut out = Vec::with_capacity(rows * width);
            for row in source {
                out.extend(row.iter().map(|&v| i64::from(v)));
                out.extend(std::iter::repeat_n(i64::from(fill), width - row.len()));
            }
            out
        };
        specs
            .iter()
            .map(|spec| {
                let values = match spec.name.as_str() {
                    "input_ids" => padded(&batch.ids, self.pad_id),
                    "token_type_ids" => padded(&batch.type_ids, 0),
                    _ => {
                        let ones: Vec<Vec<u32>> =
                            batch.ids.iter().map(|r| vec![1; r.len()]).collect();
                        padded(&ones, 0)
                    }
                };
                let data = match spec.datatype {
                    // Token ids and masks are far below 2^31.
                    DataType::Int32 => {
                        TensorData::Int32(values.into_iter().map(|v| v as i32).collect())
                    }
                    _ => TensorData::Int64(values),
                };
                Tensor::new(spec.name.clone(), vec![rows, width], data)
                    .map_err(|e| RuntimeError::Run(e.to_string()))
            })
            .collect()
    }

    /// Turns graph outputs into the task's answer: `embeddings` or `probabilities`, [n, k].
    pub fn postprocess(
        &self,
        meta: &ModelMeta,
        batch: &TextBatch,
        outputs: Vec<Tensor>,
    ) -> Result<Tensor, RuntimeError> {
        let name = &self.settings.output;
        let output = outputs
            .into_iter()
            .find(|o| &o.name == name)
            .ok_or_else(|| RuntimeError::Output {
                name: name.clone(),
                reason: "not produced".into(),
            })?;
        let bad = |reason: String| RuntimeError::Output {
            name: name.clone(),
            reason,
        };
        let values: Vec<f32> = match &output.data {
            TensorData::Fp32(v) | TensorData::Fp16(v) => v.clone(),
            TensorData::Fp64(v) => v.iter().map(|x| *x as f32).collect(),
            other => return Err(bad(format!("{} is not a float type", other.datatype()))),
        };
        let rows = batch.len();
        let pooling = if meta.task == Task::Classification {
            Pooling::None
        } else {
            self.settings.pooling
        };

        let (dim, mut result) = match (pooling, output.shape.as_slice()) {
            (Pooling::None, [n, d]) if *n == rows => (*d, values),
            (Pooling::Mean | Pooling::Cls, [n, width, d])
                if *n == rows && *width == batch.width() =>
            {
                (*d, pool(&values, batch, *width, *d, pooling))
            }
            (_, shape) => {
                return Err(bad(format!(
                    "shape {shape:?} does not fit {pooling:?} pooling of {rows} texts"
                )))
            }
        };

        match meta.task {
            Task::Classification => {
                if dim != meta.labels.len() {
                    return Err(bad(format!(
                        "{dim} logits for {} labels",
                        meta.labels.len()
                    )));
                }
                result.chunks_mut(dim).for_each(softmax);
            }
            _ if self.settings.normalize => result.chunks_mut(dim).for_each(l2_normalize),
            _ => {}
        }
        Tensor::new(
            text_output_name(meta.task),
            vec![rows, dim],
            TensorData::Fp32(result),
        )
        .map_err(|e| bad(e.to_string()))
    }
}

/// Pools token vectors [rows, width, dim] into [rows, dim] using each text's real length.
fn pool(values: &[f32], batch: &TextBatch, width: usize, dim: usize, pooling: Pooling) -> Vec<f32> {
    let mut out = vec![0f32; batch.len() * dim];
    for (row, ids) in batch.ids.iter().enumerate() {
        let target = &mut out[row * dim..(row + 1) * dim];
        let token = |t: usize| &values[(row * width + t) * dim..(row * width + t + 1) * dim];
        match pooling {
            Pooling::Cls => target.copy_from_slice(token(0)),
            _ => {
                let len = ids.len().max(1);
                for t in 0..ids.len() {
                    target
                        .iter_mut()
                        .zip(token(t))
                        .for_each(|(acc, v)| *acc += v);
                }
                target.iter_mut().for_each(|v| *v /= len as f32);
            }
        }
    }
    out
}

fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}

fn l2_normalize(row: &mut [f32]) {
    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    row.iter_mut().for_each(|v| *v /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut row = [1.0, 3.0, 2.0];
        softmax(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[1] > row[2] && row[2] > row[0]);
    }

    #[test]
    fn l2_normalize_gives_unit_length_and_survives_zero() {
        let mut row = [3.0, 4.0];
        l2_normalize(&mut row);
        assert_eq!(row, [0.6, 0.8]);
        let mut zero = [0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, [0.0, 0.0]);
    }

    #[test]
    fn mean_pooling_ignores_padding() {
        let batch = TextBatch {
            ids: vec![vec![1, 2], vec![1]],
            type_ids: vec![vec![0, 0], vec![0]],
            tokens: vec![vec![], vec![]],
            offsets: vec![vec![], vec![]],
            truncated: vec![false, false],
        };
        // rows=2, width=2, dim=1: row 1's second token is padding worth 100.
        let values = [1.0, 3.0, 5.0, 100.0];
        assert_eq!(pool(&values, &batch, 2, 1, Pooling::Mean), vec![2.0, 5.0]);
        assert_eq!(pool(&values, &batch, 2, 1, Pooling::Cls), vec![1.0, 5.0]);
    }
}
