//! PostgreSQL's text form of arrays: `{1,2,NULL}`, `{"a b","c\"d"}`, `{{1,2},{3,4}}`, with an
//! optional dimension prefix such as `[0:1]=`. Elements are decoded by the caller's function and
//! separated by the element type's delimiter (`,`, or `;` for `box`).

use walsync_types::Value;

/// `Ok(None)` is an array whose dimensions do not all start at 1 (a `Value::Array` cannot say
/// where they start); `Err(None)` is a malformed literal; `Err(Some(e))` is an element that
/// failed to decode.
pub(super) fn parse<E>(
    s: &str,
    delimiter: u8,
    element: &dyn Fn(&str) -> Result<Value, E>,
) -> Result<Option<Value>, Option<E>> {
    let body = match s.strip_prefix('[') {
        Some(_) => {
            let (dims, body) = s.split_once('=').ok_or(None)?;
            // `[1:2][1:3]`: every lower bound must be 1.
            let starts_at_one = dims.split('[').filter(|d| !d.is_empty()).all(|d| {
                d.split_once(':')
                    .is_some_and(|(lower, _)| lower.trim() == "1")
            });
            if !starts_at_one {
                return Ok(None);
            }
            body
        }
        None => s,
    };
    let mut p = Parser {
        s: body.as_bytes(),
        pos: 0,
        delimiter,
    };
    let v = p.array(element)?;
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err(None);
    }
    Ok(Some(v))
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    delimiter: u8,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn array<E>(&mut self, element: &dyn Fn(&str) -> Result<Value, E>) -> Result<Value, Option<E>> {
        self.skip_ws();
        if self.peek() != Some(b'{') {
            return Err(None);
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            let item = match self.peek() {
                Some(b'{') => self.array(element)?,
                Some(b'"') => element(&self.quoted()?).map_err(Some)?,
                Some(_) => {
                    let raw = self.unquoted()?;
                    if raw.eq_ignore_ascii_case("NULL") {
                        Value::Null
                    } else {
                        element(raw).map_err(Some)?
                    }
                }
                None => return Err(None),
            };
            items.push(item);
            self.skip_ws();
            match self.peek() {
                Some(c) if c == self.delimiter => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(None),
            }
        }
    }

    fn quoted<E>(&mut self) -> Result<String, Option<E>> {
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        loop {
            match self.peek().ok_or(None)? {
                b'"' => {
                    self.pos += 1;
                    return String::from_utf8(out).map_err(|_| None);
                }
                b'\\' => {
                    out.push(*self.s.get(self.pos + 1).ok_or(None)?);
                    self.pos += 2;
                }
                c => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn unquoted<E>(&mut self) -> Result<&str, Option<E>> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c != self.delimiter && !matches!(c, b'}' | b'{' | b'"'))
        {
            self.pos += 1;
        }
        let raw = std::str::from_utf8(&self.s[start..self.pos]).map_err(|_| None)?;
        Ok(raw.trim_end())
    }
}
