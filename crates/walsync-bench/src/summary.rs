//! The figures a benchmark publishes, gathered by `walsync-bench all` into one table (the one
//! that opens docs/benchmarks.md): what was measured, walsync's figure, its in-run baseline
//! where it has one, and their ratio.

use std::fmt::Write as _;

/// One published figure.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    pub what: String,
    pub walsync: String,
    /// The same work done without walsync in the same run (`pg_recvlogical`, PostgreSQL's
    /// `COPY`, direct writes); empty where there is none.
    pub baseline: String,
    /// walsync's rate over the baseline's.
    pub ratio: Option<f64>,
}

/// A benchmark's figures, in the order it measured them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Summary(pub Vec<Figure>);

impl Summary {
    pub(crate) fn add(
        &mut self,
        what: impl Into<String>,
        walsync: impl Into<String>,
        baseline: impl Into<String>,
        ratio: Option<f64>,
    ) {
        self.0.push(Figure {
            what: what.into(),
            walsync: walsync.into(),
            baseline: baseline.into(),
            ratio,
        });
    }

    pub(crate) fn extend(&mut self, other: Summary) {
        self.0.extend(other.0);
    }

    /// The table in Markdown.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::from(
            "| measured | walsync | baseline (same run) | ratio |\n|---|---:|---:|---:|\n",
        );
        for f in &self.0 {
            let ratio = f.ratio.map_or(String::new(), |r| format!("{r:.2}×"));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {ratio} |",
                f.what, f.walsync, f.baseline
            );
        }
        out
    }
}

/// Rows (or other units) per second, rounded as the tables print them.
pub(crate) fn rate(n: f64, unit: &str) -> String {
    format!("{n:.0} {unit}/s")
}
