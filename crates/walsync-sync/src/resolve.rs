//! A request's buckets at a checkpoint: those that follow from the request alone, plus those
//! the parameter index names for its lookup keys, each with its priority and the reasons
//! (default streams, subscriptions) the request holds it for. Parameter queries are never run
//! against the source database.

use std::collections::BTreeMap;

use walsync_rules::{ChainedLookup, Lookup, RequestContext, StreamRequest, SyncRules};
use walsync_storage::{Result, StoreRead};
use walsync_types::{BucketReason, LookupKey, StreamDescription, bucket_id_of_text};

/// One bucket of a request: the priority it is sent at (the highest, i.e. lowest number, of
/// its reasons) and why the request holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub priority: u32,
    pub reasons: Vec<BucketReason>,
}

/// A request's buckets at a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// By bucket id.
    pub buckets: BTreeMap<String, Placement>,
    /// The lookup keys the buckets were found under (a change to one of those can change the
    /// bucket set).
    pub lookups: Vec<LookupKey>,
    /// The streams the request involves, with the subscriptions that could not be resolved.
    pub streams: Vec<StreamDescription>,
}

/// The buckets `request` (with its stream subscriptions `wanted`) holds at checkpoint `at`.
pub fn request_buckets<S: StoreRead + ?Sized>(
    store: &S,
    rules: &SyncRules,
    request: &RequestContext,
    wanted: &StreamRequest,
    at: u64,
) -> Result<Resolved> {
    let selection = rules.select(request, wanted);
    let mut resolved = Resolved {
        streams: selection.streams,
        ..Resolved::default()
    };
    let mut place = |bucket: String, priority: Option<u8>, reason: Option<BucketReason>| {
        let priority = u32::from(priority.unwrap_or_else(|| {
            rules
                .definition_of(&bucket)
                .map_or(walsync_protocol::DEFAULT_PRIORITY as u8, |d| d.priority)
        }));
        let p = resolved.buckets.entry(bucket).or_insert(Placement {
            priority,
            reasons: Vec::new(),
        });
        p.priority = p.priority.min(priority);
        if let Some(r) = reason
            && !p.reasons.contains(&r)
        {
            p.reasons.push(r);
        }
    };
    for part in selection.parts {
        for bucket in part.buckets {
            place(bucket, part.priority, part.reason);
        }
        let mut keys = part.lookups;
        for chain in &part.chains {
            keys.extend(filled(store, chain, at, &mut resolved.lookups)?);
        }
        for key in keys {
            // Request values a stream adds to what the entries hold.
            let completion = part
                .completions
                .iter()
                .find(|c| c.definition == key.definition && c.query == key.query);
            for params in store.lookup_texts(&key, at)? {
                let params = match completion {
                    None => params,
                    Some(c) => match c.complete(&params) {
                        Some(p) => p,
                        None => continue,
                    },
                };
                place(
                    bucket_id_of_text(&key.definition, &params),
                    part.priority,
                    part.reason,
                );
            }
            resolved.lookups.push(key);
        }
    }
    resolved.lookups.sort();
    resolved.lookups.dedup();
    Ok(resolved)
}

/// The keys of `chain` with its hole filled by each value its source finds at `at` (a stream's
/// nested subquery or join); every key read on the way goes into `consulted`, so that a change
/// to any of them re-resolves the stream.
fn filled<S: StoreRead + ?Sized>(
    store: &S,
    chain: &ChainedLookup,
    at: u64,
    consulted: &mut Vec<LookupKey>,
) -> Result<Vec<LookupKey>> {
    let sources = match chain.source.as_ref() {
        Lookup::Key(key) => vec![key.clone()],
        Lookup::Chained(inner) => filled(store, inner, at, consulted)?,
    };
    let mut values = Vec::new();
    for key in sources {
        for text in store.lookup_texts(&key, at)? {
            // A chained query's entry is the JSON array of its one value.
            if let Ok(serde_json::Value::Array(v)) = serde_json::from_str(&text)
                && let Some(value) = v.first().map(walsync_types::Value::from_json)
                && let Some(canonical) = walsync_rules::canonical(&value)
            {
                values.push(canonical);
            }
        }
        consulted.push(key);
    }
    values.sort();
    values.dedup();
    Ok(values
        .into_iter()
        .map(|v| {
            let mut key = chain.key.clone();
            key.values[chain.hole] = v;
            key
        })
        .collect())
}
