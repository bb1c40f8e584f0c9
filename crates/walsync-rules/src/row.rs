//! A row as the rules see it.

use walsync_types::Value;

/// A row of a table, as the rules see it: complete (no unchanged-TOAST gaps).
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    pub schema: &'a str,
    pub table: &'a str,
    pub columns: &'a [String],
    pub values: &'a [Value],
}

impl RowRef<'_> {
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.columns
            .iter()
            .position(|c| c == column)
            .and_then(|i| self.values.get(i))
    }
}
