//! From message bodies to a batch's RowBinary rows, with the batch's [`Shape`]: encoding
//! one delivery as it arrives, and encoding a flushed batch again when the table's
//! layout changed under it (an INSERT refused for the table's shape).

use std::{ops::Range, sync::Arc};

use bytes::Bytes;

use crate::batch::{Batch, BatchParts, RefusedRow};
use crate::columns::{Columns, Layout, Shape};
use crate::error::Result;
use crate::event::{InvalidMessage, Row};
use crate::store::Store;

/// Decodes `body` and appends its row to `batch`. The first row of a batch fixes the
/// batch's layout (the current one); a row naming a defaulted extra column the batch
/// does not write yet widens the batch's shape, and the rows already in it are encoded
/// again (once per column and batch at most). On `Err` the batch is unchanged. Returns
/// the event's timestamp; the caller then records the row with `Batch::push_row`.
/// `tag` and `redelivered` are for the debug log.
pub(crate) fn encode_into(
    batch: &mut Batch,
    columns: &Columns,
    body: &[u8],
    max_bytes: usize,
    (tag, redelivered): (u64, bool),
) -> Result<u32, InvalidMessage> {
    if batch.is_empty() && !Arc::ptr_eq(&batch.shape.layout, &columns.current()) {
        batch.shape = Shape::new(columns.current());
    }
    let row = Row::decode_with(body, max_bytes, &batch.shape.layout)?;
    log::debug!(
        "delivery {tag}{}: short_code {:?}, timestamp {}",
        if redelivered { " (redelivered)" } else { "" },
        row.short_code,
        row.timestamp
    );
    if !row.needs_more_than(&batch.shape) {
        let (shape, rows) = batch.shape_and_rows();
        return row.encode_with(shape, rows).map(|()| row.timestamp);
    }
    let mut wider = batch.shape.clone();
    row.widen(&mut wider);
    let mut encoded = Vec::new();
    let mut row_ends = Vec::with_capacity(batch.len() + 1);
    for earlier in batch.bodies() {
        // Valid under the same layout, and missing the new columns: cannot fail.
        Row::decode_with(earlier, usize::MAX, &wider.layout)?.encode_with(&wider, &mut encoded)?;
        row_ends.push(encoded.len());
    }
    row.encode_with(&wider, &mut encoded)?;
    let pending = encoded.split_off(row_ends.last().copied().unwrap_or(0));
    batch.replace_rows(encoded, row_ends);
    batch.shape = wider;
    batch.row_buffer().extend_from_slice(&pending);
    Ok(row.timestamp)
}

/// After an INSERT refused for shape reasons: reads the layout again and, if it differs
/// from the batch's, encodes the batch again with it. Rows that do not fit the new
/// layout are returned as refused (their rows are left empty); `None` when the layout
/// did not change.
///
/// # Errors
/// As [`Columns::refresh`].
pub(crate) async fn reshape_if_changed(
    columns: &Columns,
    store: &Store,
    batch: &mut BatchParts,
) -> Result<Option<Vec<RefusedRow>>> {
    let (layout, _) = columns.refresh(store).await?;
    if *layout == *batch.shape.layout {
        return Ok(None);
    }
    log::warn!(
        "the columns of {} changed under a batch: encoding its {} rows again",
        store.qualified_table(),
        batch.row_ends.len()
    );
    Ok(Some(reshape(batch, layout)))
}

/// Encodes every row of `batch` again with `layout`; returns the rows that no longer fit.
pub(crate) fn reshape(batch: &mut BatchParts, layout: Arc<Layout>) -> Vec<RefusedRow> {
    let mut shape = Shape::new(layout);
    let decoded: Vec<Result<Row<'_>, InvalidMessage>> = batch
        .bodies()
        .map(|body| Row::decode_with(body, usize::MAX, &shape.layout))
        .collect();
    for row in decoded.iter().flatten() {
        row.widen(&mut shape);
    }
    let mut rows = Vec::with_capacity(batch.rows.len());
    let mut row_ends = Vec::with_capacity(decoded.len());
    let mut refused = Vec::new();
    for (index, row) in decoded.iter().enumerate() {
        let encoded = match row {
            Ok(row) => row.encode_with(&shape, &mut rows),
            Err(e) => Err(e.clone()),
        };
        if let Err(reason) = encoded {
            refused.push(RefusedRow { index, reason });
        }
        row_ends.push(rows.len());
    }
    drop(decoded);
    batch.rows = Bytes::from(rows);
    batch.row_ends = row_ends;
    batch.shape = shape;
    refused
}

/// The ranges of rows to insert: all rows but `refused`.
pub(crate) fn ranges_without(rows: usize, refused: &[RefusedRow]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    for index in refused.iter().map(|r| r.index) {
        if index > start {
            ranges.push(start..index);
        }
        start = index + 1;
    }
    if rows > start {
        ranges.push(start..rows);
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::InvalidKind;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // arrays of ranges are what is compared
    fn ranges_skip_the_refused_rows() {
        let refused = |indexes: &[usize]| -> Vec<RefusedRow> {
            indexes
                .iter()
                .map(|&index| RefusedRow {
                    index,
                    reason: InvalidMessage::new(InvalidKind::InvalidField, "x"),
                })
                .collect()
        };
        assert_eq!(ranges_without(5, &[]), [0..5]);
        assert_eq!(ranges_without(5, &refused(&[0, 2])), [1..2, 3..5]);
        assert_eq!(ranges_without(3, &refused(&[2])), [0..2]);
        assert_eq!(ranges_without(2, &refused(&[0, 1])), []);
    }
}
