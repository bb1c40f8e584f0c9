//! The RSocket frames PowerSync's SDKs use for the sync stream over a WebSocket (RSocket 1.0,
//! one frame per binary WebSocket message, so without RSocket's length prefix): SETUP,
//! REQUEST_STREAM, REQUEST_N, CANCEL, KEEPALIVE, PAYLOAD and ERROR. Any other frame type is
//! decoded as [`Frame::Other`] (a server ignores or refuses it). Pure, and fuzzed
//! (`fuzz/fuzz_targets/rsocket.rs`): every byte string decodes to a frame or an error.

/// RSocket's error codes (the ones walsync sends).
pub mod code {
    pub const INVALID_SETUP: u32 = 0x001;
    pub const UNSUPPORTED_SETUP: u32 = 0x002;
    pub const REJECTED_SETUP: u32 = 0x003;
    pub const CONNECTION_ERROR: u32 = 0x101;
    pub const CONNECTION_CLOSE: u32 = 0x102;
    pub const APPLICATION_ERROR: u32 = 0x201;
    pub const REJECTED: u32 = 0x202;
    pub const CANCELED: u32 = 0x203;
    pub const INVALID: u32 = 0x204;
}

const SETUP: u16 = 0x01;
const KEEPALIVE: u16 = 0x03;
const REQUEST_STREAM: u16 = 0x06;
const REQUEST_N: u16 = 0x08;
const CANCEL: u16 = 0x09;
const PAYLOAD: u16 = 0x0A;
const ERROR: u16 = 0x0B;

const FLAG_METADATA: u16 = 0x100;
/// SETUP: resume enabled; KEEPALIVE: respond; PAYLOAD and requests: follows (fragmented).
const FLAG_RESUME_RESPOND_FOLLOWS: u16 = 0x80;
/// SETUP: lease; PAYLOAD: complete.
const FLAG_LEASE_COMPLETE: u16 = 0x40;
const FLAG_NEXT: u16 = 0x20;

/// The largest metadata RSocket can frame (a 24-bit length).
pub const MAX_METADATA: usize = (1 << 24) - 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Setup(Setup),
    Keepalive {
        respond: bool,
        last_position: u64,
        data: Vec<u8>,
    },
    RequestStream {
        stream: u32,
        initial_n: u32,
        /// More fragments follow (walsync does not reassemble them).
        follows: bool,
        metadata: Option<Vec<u8>>,
        data: Vec<u8>,
    },
    RequestN {
        stream: u32,
        n: u32,
    },
    Cancel {
        stream: u32,
    },
    Payload {
        stream: u32,
        next: bool,
        complete: bool,
        follows: bool,
        metadata: Option<Vec<u8>>,
        data: Vec<u8>,
    },
    Error {
        stream: u32,
        code: u32,
        message: String,
    },
    /// A frame of another type: its stream and type.
    Other {
        stream: u32,
        kind: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub major: u16,
    pub minor: u16,
    /// Milliseconds between the client's keepalives.
    pub keepalive_ms: u32,
    /// Milliseconds without a keepalive after which the peer is dead.
    pub lifetime_ms: u32,
    pub resume: bool,
    pub lease: bool,
    pub metadata_mime: String,
    pub data_mime: String,
    pub metadata: Option<Vec<u8>>,
    pub data: Vec<u8>,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an rsocket frame: {0}")]
pub struct FrameError(pub &'static str);

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.bytes.len() < n {
            return Err(FrameError("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Result<usize, FrameError> {
        let b = self.take(3)?;
        Ok(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn ascii(&mut self) -> Result<String, FrameError> {
        let n = usize::from(self.u8()?);
        let b = self.take(n)?;
        if !b.is_ascii() {
            return Err(FrameError("a mime type that is not ascii"));
        }
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    /// Metadata (when the flag says so, 24-bit length first), then the rest as data.
    fn payload(&mut self, flags: u16) -> Result<(Option<Vec<u8>>, Vec<u8>), FrameError> {
        let metadata = if flags & FLAG_METADATA != 0 {
            let n = self.u24()?;
            Some(self.take(n)?.to_vec())
        } else {
            None
        };
        Ok((metadata, self.take(self.bytes.len())?.to_vec()))
    }
}

impl Frame {
    /// One frame from one WebSocket message.
    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        let mut r = Reader { bytes };
        let stream = r.u32()?;
        if stream & 0x8000_0000 != 0 {
            return Err(FrameError("a stream id with its reserved bit set"));
        }
        let type_flags = r.u16()?;
        let (kind, flags) = (type_flags >> 10, type_flags & 0x3FF);
        Ok(match kind {
            SETUP => {
                let major = r.u16()?;
                let minor = r.u16()?;
                let keepalive_ms = r.u32()?;
                let lifetime_ms = r.u32()?;
                let resume = flags & FLAG_RESUME_RESPOND_FOLLOWS != 0;
                if resume {
                    let n = usize::from(r.u16()?);
                    r.take(n)?;
                }
                let metadata_mime = r.ascii()?;
                let data_mime = r.ascii()?;
                let (metadata, data) = r.payload(flags)?;
                Frame::Setup(Setup {
                    major,
                    minor,
                    keepalive_ms,
                    lifetime_ms,
                    resume,
                    lease: flags & FLAG_LEASE_COMPLETE != 0,
                    metadata_mime,
                    data_mime,
                    metadata,
                    data,
                })
            }
            KEEPALIVE => Frame::Keepalive {
                respond: flags & FLAG_RESUME_RESPOND_FOLLOWS != 0,
                last_position: r.u64()? & !(1 << 63),
                data: r.take(r.bytes.len())?.to_vec(),
            },
            REQUEST_STREAM => {
                let initial_n = r.u32()?;
                let (metadata, data) = r.payload(flags)?;
                Frame::RequestStream {
                    stream,
                    initial_n,
                    follows: flags & FLAG_RESUME_RESPOND_FOLLOWS != 0,
                    metadata,
                    data,
                }
            }
            REQUEST_N => Frame::RequestN {
                stream,
                n: r.u32()? & 0x7FFF_FFFF,
            },
            CANCEL => Frame::Cancel { stream },
            PAYLOAD => {
                let (metadata, data) = r.payload(flags)?;
                Frame::Payload {
                    stream,
                    next: flags & FLAG_NEXT != 0,
                    complete: flags & FLAG_LEASE_COMPLETE != 0,
                    follows: flags & FLAG_RESUME_RESPOND_FOLLOWS != 0,
                    metadata,
                    data,
                }
            }
            ERROR => {
                let code = r.u32()?;
                let message = String::from_utf8_lossy(r.take(r.bytes.len())?).into_owned();
                Frame::Error {
                    stream,
                    code,
                    message,
                }
            }
            kind => Frame::Other { stream, kind },
        })
    }

    /// The frame as one WebSocket message. Metadata beyond [`MAX_METADATA`] cannot be framed
    /// and is cut (walsync sends none that large).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        let header = |out: &mut Vec<u8>, stream: u32, kind: u16, flags: u16| {
            out.extend_from_slice(&(stream & 0x7FFF_FFFF).to_be_bytes());
            out.extend_from_slice(&(kind << 10 | (flags & 0x3FF)).to_be_bytes());
        };
        let payload = |out: &mut Vec<u8>, metadata: &Option<Vec<u8>>, data: &[u8]| {
            if let Some(m) = metadata {
                let m = &m[..m.len().min(MAX_METADATA)];
                out.extend_from_slice(&(m.len() as u32).to_be_bytes()[1..]);
                out.extend_from_slice(m);
            }
            out.extend_from_slice(data);
        };
        let meta_flag = |m: &Option<Vec<u8>>| if m.is_some() { FLAG_METADATA } else { 0 };
        match self {
            Frame::Setup(s) => {
                let flags = meta_flag(&s.metadata)
                    | if s.lease { FLAG_LEASE_COMPLETE } else { 0 }
                    | if s.resume {
                        FLAG_RESUME_RESPOND_FOLLOWS
                    } else {
                        0
                    };
                header(&mut out, 0, SETUP, flags);
                out.extend_from_slice(&s.major.to_be_bytes());
                out.extend_from_slice(&s.minor.to_be_bytes());
                out.extend_from_slice(&s.keepalive_ms.to_be_bytes());
                out.extend_from_slice(&s.lifetime_ms.to_be_bytes());
                if s.resume {
                    // An empty resume token (walsync never asks to resume).
                    out.extend_from_slice(&0u16.to_be_bytes());
                }
                for mime in [&s.metadata_mime, &s.data_mime] {
                    let m = &mime.as_bytes()[..mime.len().min(255)];
                    out.push(m.len() as u8);
                    out.extend_from_slice(m);
                }
                payload(&mut out, &s.metadata, &s.data);
            }
            Frame::Keepalive {
                respond,
                last_position,
                data,
            } => {
                let flags = if *respond {
                    FLAG_RESUME_RESPOND_FOLLOWS
                } else {
                    0
                };
                header(&mut out, 0, KEEPALIVE, flags);
                out.extend_from_slice(&(last_position & !(1 << 63)).to_be_bytes());
                out.extend_from_slice(data);
            }
            Frame::RequestStream {
                stream,
                initial_n,
                follows,
                metadata,
                data,
            } => {
                let flags = meta_flag(metadata)
                    | if *follows {
                        FLAG_RESUME_RESPOND_FOLLOWS
                    } else {
                        0
                    };
                header(&mut out, *stream, REQUEST_STREAM, flags);
                out.extend_from_slice(&initial_n.to_be_bytes());
                payload(&mut out, metadata, data);
            }
            Frame::RequestN { stream, n } => {
                header(&mut out, *stream, REQUEST_N, 0);
                out.extend_from_slice(&(n & 0x7FFF_FFFF).to_be_bytes());
            }
            Frame::Cancel { stream } => header(&mut out, *stream, CANCEL, 0),
            Frame::Payload {
                stream,
                next,
                complete,
                follows,
                metadata,
                data,
            } => {
                let flags = meta_flag(metadata)
                    | if *next { FLAG_NEXT } else { 0 }
                    | if *complete { FLAG_LEASE_COMPLETE } else { 0 }
                    | if *follows {
                        FLAG_RESUME_RESPOND_FOLLOWS
                    } else {
                        0
                    };
                out.reserve(data.len());
                header(&mut out, *stream, PAYLOAD, flags);
                payload(&mut out, metadata, data);
            }
            Frame::Error {
                stream,
                code,
                message,
            } => {
                header(&mut out, *stream, ERROR, 0);
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(message.as_bytes());
            }
            Frame::Other { stream, kind } => header(&mut out, *stream, *kind & 0x3F, 0),
        }
        out
    }
}

/// A value from a frame's metadata or data, encoded as the SETUP's `mime` type says: JSON
/// (PowerSync's current SDKs), or BSON (`application/bson`, their earlier versions).
pub fn decode<T: serde::de::DeserializeOwned>(mime: &str, bytes: &[u8]) -> Result<T, String> {
    if mime.contains("bson") {
        bson::deserialize_from_slice(bytes).map_err(|e| format!("not the bson expected: {e}"))
    } else {
        serde_json::from_slice(bytes).map_err(|e| format!("not the json expected: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_encoding_and_known_bytes_decode() {
        let frames = [
            Frame::Setup(Setup {
                major: 1,
                minor: 0,
                keepalive_ms: 20_000,
                lifetime_ms: 90_000,
                resume: false,
                lease: false,
                metadata_mime: "application/json".into(),
                data_mime: "application/json".into(),
                metadata: Some(br#"{"token":"Token x"}"#.to_vec()),
                data: Vec::new(),
            }),
            Frame::Keepalive {
                respond: true,
                last_position: 7,
                data: b"ping".to_vec(),
            },
            Frame::RequestStream {
                stream: 1,
                initial_n: 10,
                follows: false,
                metadata: Some(br#"{"path":"/sync/stream"}"#.to_vec()),
                data: br#"{"buckets":[]}"#.to_vec(),
            },
            Frame::RequestN { stream: 1, n: 5 },
            Frame::Cancel { stream: 1 },
            Frame::Payload {
                stream: 1,
                next: true,
                complete: true,
                follows: false,
                metadata: None,
                data: vec![0, 1, 2, 255],
            },
            Frame::Error {
                stream: 0,
                code: code::REJECTED_SETUP,
                message: "unauthenticated: é".into(),
            },
        ];
        for f in frames {
            assert_eq!(Frame::decode(&f.encode()), Ok(f.clone()), "{f:?}");
        }
        // REQUEST_N for stream 1, n = 3, as rsocket-js writes it.
        assert_eq!(
            Frame::decode(&[0, 0, 0, 1, 0x20, 0, 0, 0, 0, 3]),
            Ok(Frame::RequestN { stream: 1, n: 3 })
        );
        // PAYLOAD NEXT on stream 1 with data "a": type 0x0A << 10 | 0x20.
        assert_eq!(
            Frame::Payload {
                stream: 1,
                next: true,
                complete: false,
                follows: false,
                metadata: None,
                data: b"a".to_vec()
            }
            .encode(),
            [0, 0, 0, 1, 0x28, 0x20, b'a']
        );
    }

    #[test]
    fn truncated_and_odd_bytes_are_errors_not_panics() {
        let setup = Frame::Setup(Setup {
            major: 1,
            minor: 0,
            keepalive_ms: 1,
            lifetime_ms: 2,
            resume: false,
            lease: false,
            metadata_mime: "application/bson".into(),
            data_mime: "application/bson".into(),
            metadata: Some(vec![1; 40]),
            data: vec![2; 3],
        })
        .encode();
        for cut in 0..setup.len() - 3 {
            // Cut inside the fixed part or the metadata: an error; after it, fewer data bytes.
            let _ = Frame::decode(&setup[..cut]);
        }
        assert!(Frame::decode(&setup[..20]).is_err());
        assert_eq!(
            Frame::decode(&[0x80, 0, 0, 1, 0x20, 0]),
            Err(FrameError("a stream id with its reserved bit set"))
        );
        assert_eq!(
            Frame::decode(&[0, 0, 0, 1, 0xFC, 0]),
            Ok(Frame::Other {
                stream: 1,
                kind: 0x3F
            })
        );
    }
}
