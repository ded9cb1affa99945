#![warn(missing_docs)]
//! The flat byte encoding of wagg's plugin calls.
//!
//! `wit/aggregator.wit` specifies two buffers: the *batch* the host passes to
//! a plugin's `apply`, and the *result* the plugin returns. This crate is the
//! only implementation of both, used by the host (which encodes batches and
//! decodes results) and by the guest SDK (which decodes batches and encodes
//! results), so the two sides cannot drift apart.
//!
//! Decoders never trust their input: every length is bounds-checked, every
//! count is validated against what is left, and malformed input is a
//! [`DecodeError`], never a panic. Decoding borrows from the buffer and does
//! not allocate per record.

use std::fmt;

/// Version byte at the start of both buffers.
pub const ABI_VERSION: u8 = 1;

const FLAG_KEY: u8 = 1 << 0;
const FLAG_KEY_IS_GROUP_KEY: u8 = 1 << 1;
const FLAG_VALUE: u8 = 1 << 2;
const FLAG_TIMESTAMP: u8 = 1 << 3;
const KNOWN_FLAGS: u8 = FLAG_KEY | FLAG_KEY_IS_GROUP_KEY | FLAG_VALUE | FLAG_TIMESTAMP;

const CHANGE_UNCHANGED: u8 = 0;
const CHANGE_SET: u8 = 1;
const CHANGE_DELETE: u8 = 2;

/// Why a buffer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("buffer ends early: needed {needed} more bytes at offset {offset}")]
    /// The buffer ended `needed` bytes short of an item at `offset`.
    Truncated {
        /// Where the item starts.
        offset: usize,
        /// How many more bytes it needs.
        needed: usize,
    },
    #[error("unsupported ABI version {0} (this build speaks version {ABI_VERSION})")]
    /// The buffer was encoded for another ABI version.
    Version(u8),
    #[error("invalid {what} byte {value} at offset {offset}")]
    /// A tag byte (option, change kind) with no meaning.
    InvalidTag {
        /// Which tag.
        what: &'static str,
        /// The byte found.
        value: u8,
        /// Where.
        offset: usize,
    },
    #[error("{0} trailing bytes after the last group")]
    /// Bytes left after the last group.
    TrailingBytes(usize),
    #[error("header name is not UTF-8")]
    /// A header name that is not UTF-8.
    HeaderName,
}

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

/// One Kafka record as a plugin sees it. Borrowed: cheap to build and copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The record's own Kafka key (`None` for a null key). This may differ from
    /// the group key when the aggregation re-keys records by a value field.
    pub key: Option<&'a [u8]>,
    /// The record's value (`None` for a tombstone).
    pub value: Option<&'a [u8]>,
    /// Milliseconds since the Unix epoch, when the record has a timestamp.
    pub timestamp: Option<i64>,
    /// The Kafka partition it was consumed from.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
    /// Its headers, in order.
    pub headers: Headers<'a>,
}

/// A record's headers, decoded lazily from the buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Headers<'a> {
    count: u32,
    bytes: &'a [u8],
}

impl fmt::Debug for Headers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> Headers<'a> {
    /// No headers.
    pub const EMPTY: Headers<'static> = Headers {
        count: 0,
        bytes: &[],
    };

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates `(name, value)` pairs in record order. The headers were
    /// validated when the record was decoded, so iteration cannot fail.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        let mut reader = Reader::new(self.bytes);
        (0..self.count).map_while(move |_| read_header(&mut reader).ok())
    }

    /// The value of the first header called `name`.
    pub fn get(&self, name: &str) -> Option<Option<&'a [u8]>> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// An owned header, for building records on the host side.
pub type Header<'a> = (&'a str, Option<&'a [u8]>);

// ---------------------------------------------------------------------------
// Low-level reader / writer
// ---------------------------------------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        let offset = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::InvalidTag {
                what,
                value,
                offset,
            }),
        }
    }

    fn optional_bytes(&mut self, what: &'static str) -> Result<Option<&'a [u8]>, DecodeError> {
        if self.flag(what)? {
            Ok(Some(self.bytes()?))
        } else {
            Ok(None)
        }
    }

    fn version(&mut self) -> Result<(), DecodeError> {
        match self.u8()? {
            ABI_VERSION => Ok(()),
            other => Err(DecodeError::Version(other)),
        }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// The framing both buffers share: a version byte, a group count, then the
/// groups. After an error nothing more is read.
struct Framing<'a> {
    reader: Reader<'a>,
    groups_left: u32,
}

impl<'a> Framing<'a> {
    fn new(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(buf);
        reader.version()?;
        let groups_left = reader.u32()?;
        Ok(Self {
            reader,
            groups_left,
        })
    }

    /// Reads the next group with `read`; `None` after the last one, when
    /// trailing bytes are an error.
    fn next<T>(
        &mut self,
        read: impl FnOnce(&mut Reader<'a>) -> Result<T, DecodeError>,
    ) -> Option<Result<T, DecodeError>> {
        if self.groups_left == 0 {
            return self.reader.finish().err().map(Err);
        }
        self.groups_left -= 1;
        let result = read(&mut self.reader);
        if result.is_err() {
            self.groups_left = 0;
            self.reader.pos = self.reader.buf.len();
        }
        Some(result)
    }
}

fn read_header<'a>(reader: &mut Reader<'a>) -> Result<Header<'a>, DecodeError> {
    let name = std::str::from_utf8(reader.bytes()?).map_err(|_| DecodeError::HeaderName)?;
    let value = reader.optional_bytes("header has-value")?;
    Ok((name, value))
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Lengths above u32::MAX cannot be encoded; callers cap sizes far below.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn put_optional_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
        None => out.push(0),
    }
}

fn patch_u32(out: &mut [u8], at: usize, value: u32) {
    out[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

// ---------------------------------------------------------------------------
// Batch: host encodes, guest decodes
// ---------------------------------------------------------------------------

/// Builds a batch buffer group by group. Reuse one encoder across batches
/// (call [`BatchEncoder::clear`]) to avoid reallocating.
#[derive(Debug, Default)]
pub struct BatchEncoder {
    buf: Vec<u8>,
    groups: u32,
    /// Position of the current group's record count and the group key's
    /// range, so records can refer to the group key without repeating it.
    open_group: Option<OpenGroup>,
}

#[derive(Debug, Clone, Copy)]
struct OpenGroup {
    count_at: usize,
    records: u32,
    key_start: usize,
    key_end: usize,
}

impl BatchEncoder {
    /// An empty batch.
    pub fn new() -> Self {
        let mut encoder = Self::default();
        encoder.clear();
        encoder
    }

    /// Empties the batch, keeping its buffer for the next one.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.buf.push(ABI_VERSION);
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.groups = 0;
        self.open_group = None;
    }

    /// How many groups the buffer holds.
    pub fn group_count(&self) -> u32 {
        self.groups
    }

    /// Starts a new group; the previous one, if any, is closed.
    pub fn begin_group(&mut self, key: &[u8], state: Option<&[u8]>) {
        self.close_group();
        put_len(&mut self.buf, key.len());
        let key_start = self.buf.len();
        self.buf.extend_from_slice(key);
        let key_end = self.buf.len();
        put_optional_bytes(&mut self.buf, state);
        let count_at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.groups += 1;
        self.open_group = Some(OpenGroup {
            count_at,
            records: 0,
            key_start,
            key_end,
        });
    }

    /// Appends a record to the open group.
    ///
    /// # Panics
    /// If no group is open: that is a bug in the caller, not bad input.
    pub fn push_record(&mut self, record: &Record<'_>) {
        let group = self
            .open_group
            .as_mut()
            .expect("BatchEncoder::push_record called before begin_group");
        group.records += 1;
        let group_key = group.key_start..group.key_end;
        let mut flags = 0;
        let mut own_key = None;
        if let Some(key) = record.key {
            flags |= FLAG_KEY;
            if key == &self.buf[group_key] {
                flags |= FLAG_KEY_IS_GROUP_KEY;
            } else {
                own_key = Some(key);
            }
        }
        if record.value.is_some() {
            flags |= FLAG_VALUE;
        }
        if record.timestamp.is_some() {
            flags |= FLAG_TIMESTAMP;
        }
        self.buf.push(flags);
        if let Some(key) = own_key {
            put_bytes(&mut self.buf, key);
        }
        if let Some(value) = record.value {
            put_bytes(&mut self.buf, value);
        }
        if let Some(ts) = record.timestamp {
            self.buf.extend_from_slice(&ts.to_le_bytes());
        }
        self.buf.extend_from_slice(&record.partition.to_le_bytes());
        self.buf.extend_from_slice(&record.offset.to_le_bytes());
        self.buf
            .extend_from_slice(&record.headers.count.to_le_bytes());
        self.buf.extend_from_slice(record.headers.bytes);
    }

    /// Appends a record whose headers are given as `(name, value)` pairs
    /// (the host's view of a Kafka message) rather than as [`Headers`].
    pub fn push_record_with_headers<'h>(
        &mut self,
        record: &Record<'_>,
        headers: impl ExactSizeIterator<Item = Header<'h>>,
    ) {
        self.push_record(&Record {
            headers: Headers::EMPTY,
            ..*record
        });
        // `push_record` wrote a zero header count last; replace it.
        let count_at = self.buf.len() - 4;
        patch_u32(
            &mut self.buf,
            count_at,
            u32::try_from(headers.len()).unwrap_or(u32::MAX),
        );
        for (name, value) in headers {
            put_bytes(&mut self.buf, name.as_bytes());
            put_optional_bytes(&mut self.buf, value);
        }
    }

    fn close_group(&mut self) {
        if let Some(group) = self.open_group.take() {
            patch_u32(&mut self.buf, group.count_at, group.records);
        }
    }

    /// Finishes the batch and returns the encoded bytes.
    pub fn finish(&mut self) -> &[u8] {
        self.close_group();
        patch_u32(&mut self.buf, 1, self.groups);
        &self.buf
    }
}

/// Reads a batch buffer group by group.
pub struct BatchDecoder<'a> {
    framing: Framing<'a>,
}

/// One key's records and current state.
#[derive(Debug)]
pub struct Group<'a> {
    /// The group's key.
    pub key: &'a [u8],
    /// Its current state (`None`: no state yet).
    pub state: Option<&'a [u8]>,
    record_count: u32,
    records: &'a [u8],
}

impl<'a> BatchDecoder<'a> {
    /// Reads a batch buffer's header; groups are decoded one at a time.
    pub fn new(buf: &'a [u8]) -> Result<Self, DecodeError> {
        Ok(Self {
            framing: Framing::new(buf)?,
        })
    }

    /// How many groups the buffer holds.
    pub fn group_count(&self) -> u32 {
        self.framing.groups_left
    }

    /// The next group, with its records validated; `None` after the last one
    /// (when trailing bytes are an error).
    pub fn next_group(&mut self) -> Option<Result<Group<'a>, DecodeError>> {
        self.framing.next(read_batch_group)
    }
}

fn read_batch_group<'a>(reader: &mut Reader<'a>) -> Result<Group<'a>, DecodeError> {
    let key = reader.bytes()?;
    let state = reader.optional_bytes("has-state")?;
    let record_count = reader.u32()?;
    let start = reader.pos;
    for _ in 0..record_count {
        read_record(reader, key)?;
    }
    Ok(Group {
        key,
        state,
        record_count,
        records: &reader.buf[start..reader.pos],
    })
}

impl<'a> Group<'a> {
    /// How many records the group holds.
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// The group's records, in batch order.
    pub fn records(&self) -> impl Iterator<Item = Record<'a>> + 'a {
        let mut reader = Reader::new(self.records);
        let key = self.key;
        // Already validated by `BatchDecoder::read_group`.
        (0..self.record_count).map_while(move |_| read_record(&mut reader, key).ok())
    }
}

fn read_record<'a>(
    reader: &mut Reader<'a>,
    group_key: &'a [u8],
) -> Result<Record<'a>, DecodeError> {
    let offset = reader.pos;
    let flags = reader.u8()?;
    if flags & !KNOWN_FLAGS != 0 || (flags & FLAG_KEY_IS_GROUP_KEY != 0 && flags & FLAG_KEY == 0) {
        return Err(DecodeError::InvalidTag {
            what: "record flags",
            value: flags,
            offset,
        });
    }
    let key = match (flags & FLAG_KEY != 0, flags & FLAG_KEY_IS_GROUP_KEY != 0) {
        (false, _) => None,
        (true, true) => Some(group_key),
        (true, false) => Some(reader.bytes()?),
    };
    let value = if flags & FLAG_VALUE != 0 {
        Some(reader.bytes()?)
    } else {
        None
    };
    let timestamp = if flags & FLAG_TIMESTAMP != 0 {
        Some(reader.i64()?)
    } else {
        None
    };
    let partition = reader.i32()?;
    let record_offset = reader.i64()?;
    let header_count = reader.u32()?;
    let headers_start = reader.pos;
    for _ in 0..header_count {
        read_header(reader)?;
    }
    Ok(Record {
        key,
        value,
        timestamp,
        partition,
        offset: record_offset,
        headers: Headers {
            count: header_count,
            bytes: &reader.buf[headers_start..reader.pos],
        },
    })
}

// ---------------------------------------------------------------------------
// Result: guest encodes, host decodes
// ---------------------------------------------------------------------------

/// What happened to one group's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange<'a> {
    /// Keep the current state.
    Unchanged,
    /// Replace it with these bytes.
    Set(&'a [u8]),
    /// Delete the key's state.
    Delete,
}

/// A record the plugin rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordFailure<'a> {
    /// Index of the record within its group.
    pub index: u32,
    /// The plugin's message, as bytes: the host treats it as untrusted text.
    pub message: &'a [u8],
}

/// The outcome of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupResult<'a> {
    /// The state after every record before `failure.index` (all records when
    /// there is no failure).
    pub change: StateChange<'a>,
    /// The first record the plugin rejected, if any.
    pub failure: Option<RecordFailure<'a>>,
}

/// Builds a result buffer. Groups must be pushed in batch order.
#[derive(Debug)]
pub struct ResultEncoder {
    buf: Vec<u8>,
    groups: u32,
}

impl Default for ResultEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ResultEncoder {
    /// An empty result.
    pub fn new() -> Self {
        Self::with_capacity(64)
    }

    /// An empty result with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(5));
        buf.push(ABI_VERSION);
        buf.extend_from_slice(&0u32.to_le_bytes());
        Self { buf, groups: 0 }
    }

    /// Appends the next group's outcome.
    pub fn push(&mut self, result: &GroupResult<'_>) {
        match result.change {
            StateChange::Unchanged => self.buf.push(CHANGE_UNCHANGED),
            StateChange::Set(state) => {
                self.buf.push(CHANGE_SET);
                put_bytes(&mut self.buf, state);
            }
            StateChange::Delete => self.buf.push(CHANGE_DELETE),
        }
        match result.failure {
            None => self.buf.push(0),
            Some(failure) => {
                self.buf.push(1);
                self.buf.extend_from_slice(&failure.index.to_le_bytes());
                put_bytes(&mut self.buf, failure.message);
            }
        }
        self.groups += 1;
    }

    /// The encoded result buffer.
    pub fn finish(mut self) -> Vec<u8> {
        patch_u32(&mut self.buf, 1, self.groups);
        self.buf
    }
}

/// Reads a result buffer. The host checks the group count against its batch.
pub struct ResultDecoder<'a> {
    framing: Framing<'a>,
}

impl<'a> ResultDecoder<'a> {
    /// Reads a result buffer's header; groups are decoded one at a time.
    pub fn new(buf: &'a [u8]) -> Result<Self, DecodeError> {
        Ok(Self {
            framing: Framing::new(buf)?,
        })
    }

    /// How many groups the buffer holds.
    pub fn group_count(&self) -> u32 {
        self.framing.groups_left
    }

    /// The next group's outcome; `None` after the last one.
    pub fn next_group(&mut self) -> Option<Result<GroupResult<'a>, DecodeError>> {
        self.framing.next(read_group_result)
    }
}

fn read_group_result<'a>(reader: &mut Reader<'a>) -> Result<GroupResult<'a>, DecodeError> {
    let offset = reader.pos;
    let change = match reader.u8()? {
        CHANGE_UNCHANGED => StateChange::Unchanged,
        CHANGE_SET => StateChange::Set(reader.bytes()?),
        CHANGE_DELETE => StateChange::Delete,
        value => {
            return Err(DecodeError::InvalidTag {
                what: "state change",
                value,
                offset,
            });
        }
    };
    let failure = if reader.flag("failed")? {
        let index = reader.u32()?;
        let message = reader.bytes()?;
        Some(RecordFailure { index, message })
    } else {
        None
    };
    Ok(GroupResult { change, failure })
}

#[cfg(test)]
mod tests;
