//! The binary form of the store's per-row records (ops and row copies). Each is written for
//! every replicated row and read for every downloaded op, so they are small and quick to encode,
//! unlike JSON. A record starts with a tag byte that JSON never starts with, so records written
//! as JSON by earlier versions still read.

use serde::{Deserialize, Serialize};
use walsync_types::LookupEntry;
use walsync_types::Value;

use crate::{Result, StorageError};

pub(super) fn corrupt(what: &'static str, detail: &str) -> StorageError {
    StorageError::Corrupt {
        what,
        detail: detail.to_owned(),
    }
}

/// Appends fields to a record.
pub(super) struct Writer(pub Vec<u8>);

impl Writer {
    pub(super) fn with_capacity(n: usize) -> Writer {
        Writer(Vec::with_capacity(n))
    }

    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }

    pub(super) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub(super) fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.u8(0),
            Value::Bool(b) => {
                self.u8(1);
                self.u8(u8::from(*b));
            }
            Value::Int(i) => {
                self.u8(2);
                self.u64(*i as u64);
            }
            Value::Float(f) => {
                self.u8(3);
                self.u64(f.to_bits());
            }
            Value::Text(s) => {
                self.u8(4);
                self.str(s);
            }
            Value::Json(text) => {
                self.u8(5);
                self.str(text);
            }
            Value::Bytes(b) => {
                self.u8(6);
                self.bytes(b);
            }
            Value::Array(items) => {
                self.u8(7);
                self.u32(items.len() as u32);
                for item in items {
                    self.value(item);
                }
            }
        }
    }
}

/// Reads fields of a record, each read failing cleanly on a truncated or malformed record.
pub(super) struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(what: &'static str, b: &'a [u8]) -> Reader<'a> {
        Reader { rest: b, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(corrupt(self.what, "truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub(super) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(super) fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    pub(super) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub(super) fn str(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| corrupt(self.what, "not utf-8"))
    }

    /// A count of items that each take at least one byte: never more than the bytes left.
    pub(super) fn count(&mut self) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > self.rest.len() {
            return Err(corrupt(self.what, "truncated"));
        }
        Ok(n)
    }

    pub(super) fn value(&mut self) -> Result<Value> {
        Ok(match self.u8()? {
            0 => Value::Null,
            1 => Value::Bool(self.u8()? != 0),
            2 => Value::Int(self.u64()? as i64),
            3 => Value::Float(f64::from_bits(self.u64()?)),
            4 => Value::Text(self.str()?),
            // The JSON text (earlier versions wrote serde_json's text of the value: JSON too).
            5 => Value::Json(self.str()?),
            6 => Value::Bytes(self.bytes()?.to_vec()),
            7 => {
                let n = self.count()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value()?);
                }
                Value::Array(items)
            }
            _ => return Err(corrupt(self.what, "unknown value type")),
        })
    }

    pub(super) fn end(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(corrupt(self.what, "trailing bytes"))
        }
    }
}

/// Lookup entries are rare (rows of parameter tables only) and hold JSON parameters: they stay
/// JSON inside the binary record, empty when there are none.
pub(super) fn write_lookups(w: &mut Writer, lookups: &[LookupEntry]) -> Result<()> {
    if lookups.is_empty() {
        w.bytes(b"");
        return Ok(());
    }
    let json = serde_json::to_vec(lookups).map_err(|e| corrupt("encoding", &e.to_string()))?;
    w.bytes(&json);
    Ok(())
}

pub(super) fn read_lookups(r: &mut Reader<'_>) -> Result<Vec<LookupEntry>> {
    let b = r.bytes()?;
    if b.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(b).map_err(|e| corrupt("row", &e.to_string()))
}

/// An engine failure as a [`StorageError`]. A write the engine could not make (a full disk
/// above all) leaves fjall refusing every later write ("poisoned": its journal may hold a torn
/// record): that is [`StorageError::Halted`], which only reopening the store (restarting
/// walsync) ends, replaying the journal up to its last whole record.
pub(super) fn engine<E: std::fmt::Display + 'static>(e: E) -> StorageError {
    let any: &dyn std::any::Any = &e;
    match any.downcast_ref::<fjall::Error>() {
        Some(fjall::Error::Poisoned) => StorageError::Halted,
        Some(fjall::Error::Io(io)) if io.kind() == std::io::ErrorKind::StorageFull => {
            StorageError::Halted
        }
        _ => StorageError::Engine(e.to_string()),
    }
}

pub(super) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StorageError::Corrupt {
        what: "encoding",
        detail: e.to_string(),
    })
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StorageError::Corrupt {
        what,
        detail: e.to_string(),
    })
}
