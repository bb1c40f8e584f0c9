//! Sync rules: which rows go to which buckets, and which buckets a user gets.
//!
//! Rules are PowerSync's `bucket_definitions` YAML; their SQL is parsed with `sqlparser` and
//! compiled into two kinds of query per definition:
//! - **parameter queries** decide a request's buckets. One without a table
//!   (`SELECT request.user_id() AS user_id`) is answered from the request alone. One over a table
//!   (`SELECT project_id FROM project_members WHERE user_id = request.user_id()`) is never run at
//!   connect time: each replicated row of the table yields [`LookupEntry`]s (lookup key → bucket
//!   parameters) kept in storage, and a request computes its lookup keys and reads them there.
//! - **data queries** decide a row's buckets and what of it leaves the server: a row evaluates to
//!   [`RowOutput`]s (bucket, object type, object id, JSON data).
//!
//! Everything here is pure.

mod compile;
mod definition;
mod eval;
mod expr;
mod reads;
mod row;
mod streams;

pub use definition::{BucketDefinition, SyncRules};
pub use eval::{
    ChainedLookup, Completion, Lookup, RequestContext, Selection, SelectionPart, StreamRequest,
    Subscription,
};
pub use expr::canonical;
pub use reads::QueryRead;
pub use row::RowRef;
pub use streams::Stream;

/// A problem with the rules, pointing at the definition, the query and the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("sync rules are not valid yaml: {0}")]
    Yaml(String),
    #[error("bucket definition {definition:?}, {query} `{sql}`: {message}")]
    Query {
        definition: String,
        query: String,
        sql: String,
        message: String,
    },
    #[error("bucket definition {definition:?}: {message}")]
    Definition { definition: String, message: String },
    #[error("stream {stream:?}, {query} `{sql}`: {message}")]
    Stream {
        stream: String,
        query: String,
        sql: String,
        message: String,
    },
}
