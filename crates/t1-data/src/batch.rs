//! SFT examples as token ids with a loss mask, and right-padded batches of them.

use crate::{ChatTokenizer, SftExample};

/// One tokenized SFT example, truncated to `max_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Token ids, (T,).
    pub ids: Vec<u32>,
    /// (T,): true where the model should learn to predict this token.
    pub loss_mask: Vec<bool>,
}

/// Encodes an SFT conversation with the chat template and keeps its first `max_len` tokens.
pub fn tokenize_sft(tok: &ChatTokenizer, ex: &SftExample, max_len: usize) -> Result<TokenizedExample, crate::DataError> {
    let (mut ids, mut loss_mask) = tok.encode_chat(&ex.messages, false)?;
    ids.truncate(max_len);
    loss_mask.truncate(max_len);
    Ok(TokenizedExample { ids, loss_mask })
}

/// A right-padded batch; every field is row-major (B, T) with B = `batch`, T = `len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftBatch {
    /// B, the number of rows.
    pub batch: usize,
    /// T, the longest example; shorter rows are padded on the right.
    pub len: usize,
    /// (B, T) token ids, `pad_id` after each row's end.
    pub ids: Vec<i64>,
    /// (B, T) true on real tokens, false on padding.
    pub attention: Vec<bool>,
    /// (B, T) next-token targets: `targets[b, t] = ids[b, t + 1]`, `pad_id` at t = T - 1.
    pub targets: Vec<i64>,
    /// (B, T) true where `targets[b, t]` is a real token whose loss mask is set.
    pub target_mask: Vec<bool>,
    /// Packed rows ([`pad_packed`]): (B, T) the example of each token, 1, 2, ... (0 =
    /// padding). `None`: one example per row.
    pub segments: Option<Vec<u32>>,
}

/// Packs examples into rows of at most `max_len` tokens, best-fit decreasing (TRL's default
/// packing strategy, "bfd"): longest first, each into the fullest row it fits, else a new
/// row. Returns the examples of each row, in row order; deterministic. An example longer
/// than `max_len` gets a row of its own.
pub fn pack(lengths: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // (room left, row): the fullest row that fits is the first with room >= length
    let mut room: std::collections::BTreeSet<(usize, usize)> = std::collections::BTreeSet::new();
    for i in order {
        let n = lengths[i];
        match room.range((n, 0)..).next().copied() {
            Some((left, r)) => {
                room.remove(&(left, r));
                rows[r].push(i);
                if left > n {
                    room.insert((left - n, r));
                }
            }
            None => {
                rows.push(vec![i]);
                if max_len > n {
                    room.insert((max_len - n, rows.len() - 1));
                }
            }
        }
    }
    rows
}

/// Right-pads packed rows: each row holds its examples one after the other, numbered in
/// [`SftBatch::segments`]; targets never cross from one example into the next.
pub fn pad_packed(rows: &[Vec<&TokenizedExample>], pad_id: u32) -> SftBatch {
    let flat: Vec<TokenizedExample> = rows
        .iter()
        .map(|row| TokenizedExample {
            ids: row.iter().flat_map(|e| e.ids.iter().copied()).collect(),
            loss_mask: row.iter().flat_map(|e| e.loss_mask.iter().copied()).collect(),
        })
        .collect();
    let mut batch = pad_batch(&flat.iter().collect::<Vec<_>>(), pad_id);
    let mut segments = vec![0u32; batch.batch * batch.len];
    for (b, row) in rows.iter().enumerate() {
        let mut t = 0;
        for (k, e) in row.iter().enumerate() {
            segments[b * batch.len + t..b * batch.len + t + e.ids.len()].fill(k as u32 + 1);
            t += e.ids.len();
            // the last token of an example predicts nothing
            if t > 0 && k + 1 < row.len() {
                batch.targets[b * batch.len + t - 1] = pad_id as i64;
                batch.target_mask[b * batch.len + t - 1] = false;
            }
        }
    }
    batch.segments = Some(segments);
    batch
}

/// Pads `examples` on the right with `pad_id` to the longest one and shifts ids into
/// next-token targets. The loss is `sum(ce(logits, targets) * target_mask) / sum(target_mask)`.
pub fn pad_batch(examples: &[&TokenizedExample], pad_id: u32) -> SftBatch {
    let batch = examples.len();
    let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let pad = pad_id as i64;
    let mut ids = vec![pad; batch * len];
    let mut attention = vec![false; batch * len];
    let mut targets = vec![pad; batch * len];
    let mut target_mask = vec![false; batch * len];
    for (b, ex) in examples.iter().enumerate() {
        assert_eq!(ex.ids.len(), ex.loss_mask.len(), "ids and loss_mask lengths differ");
        let row = b * len;
        for (t, &id) in ex.ids.iter().enumerate() {
            ids[row + t] = id as i64;
            attention[row + t] = true;
            if t > 0 {
                targets[row + t - 1] = id as i64;
                target_mask[row + t - 1] = ex.loss_mask[t];
            }
        }
    }
    SftBatch { batch, len, ids, attention, targets, target_mask, segments: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], mask: &[u8]) -> TokenizedExample {
        TokenizedExample { ids: ids.to_vec(), loss_mask: mask.iter().map(|m| *m == 1).collect() }
    }

    #[test]
    fn targets_and_mask_are_shifted_by_one_and_padded() {
        // Row 0: prompt 10 11, answer 12 13 (EOS); row 1: prompt 20, answer 21.
        let a = ex(&[10, 11, 12, 13], &[0, 0, 1, 1]);
        let b = ex(&[20, 21], &[0, 1]);
        let got = pad_batch(&[&a, &b], 0);
        assert_eq!((got.batch, got.len), (2, 4));
        assert_eq!(got.ids, vec![10, 11, 12, 13, 20, 21, 0, 0]);
        assert_eq!(got.attention, vec![true, true, true, true, true, true, false, false]);
        assert_eq!(got.targets, vec![11, 12, 13, 0, 21, 0, 0, 0]);
        assert_eq!(got.target_mask, vec![false, true, true, false, true, false, false, false]);
    }

    #[test]
    fn empty_batch() {
        let got = pad_batch(&[], 0);
        assert_eq!((got.batch, got.len, got.ids.len()), (0, 0, 0));
    }

    #[test]
    fn tokenize_sft_truncates() {
        let tok = crate::train_bpe(&["Compute 1 + 2.".to_string()], 300).unwrap();
        let ex = crate::task::sft_example(&crate::generate(&Default::default(), 1, 1)[0]);
        let full = tokenize_sft(&tok, &ex, usize::MAX).unwrap();
        let cut = tokenize_sft(&tok, &ex, 10).unwrap();
        assert_eq!(cut.ids, full.ids[..10]);
        assert_eq!(cut.loss_mask, full.loss_mask[..10]);
        assert_eq!(full.ids.len(), tok.encode_chat(&ex.messages, false).unwrap().0.len());
    }
}

#[cfg(test)]
mod packing_tests {
    use super::*;

    #[test]
    fn best_fit_decreasing_fills_rows_and_keeps_every_example_once() {
        let lengths = [5, 3, 8, 2, 4, 7, 1];
        let rows = pack(&lengths, 10);
        let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for r in &rows {
            assert!(r.iter().map(|&i| lengths[i]).sum::<usize>() <= 10, "{rows:?}");
        }
        // 30 tokens in rows of 10: bfd needs 3 rows here (8+2, 7+3, 5+4+1)
        assert_eq!(rows, vec![vec![2, 3], vec![5, 1], vec![0, 4, 6]]);
        assert_eq!(pack(&[12, 3], 10), vec![vec![0], vec![1]], "a long example gets its own row");
    }

    #[test]
    fn packed_targets_stay_inside_each_example() {
        let a = TokenizedExample { ids: vec![10, 11, 12], loss_mask: vec![false, true, true] };
        let b = TokenizedExample { ids: vec![20, 21], loss_mask: vec![false, true] };
        let got = pad_packed(&[vec![&a, &b], vec![&b]], 0);
        assert_eq!((got.batch, got.len), (2, 5));
        assert_eq!(got.ids, vec![10, 11, 12, 20, 21, 20, 21, 0, 0, 0]);
        assert_eq!(got.segments, Some(vec![1, 1, 1, 2, 2, 1, 1, 0, 0, 0]));
        assert_eq!(got.targets, vec![11, 12, 0, 21, 0, 21, 0, 0, 0, 0]);
        assert_eq!(got.target_mask, vec![true, true, false, true, false, true, false, false, false, false]);
        // the same targets, in total, as the examples padded one per row
        let unpacked = pad_batch(&[&a, &b, &b], 0);
        assert_eq!(got.target_mask.iter().filter(|m| **m).count(), unpacked.target_mask.iter().filter(|m| **m).count());
    }
}
