//! Record headers, read without trusting their names (the source's records
//! and other instances' changelog records alike).
//!
//! rdkafka's `Headers::iter`/`get` convert every header name with
//! `CStr::to_str().unwrap()`: one record whose header *name* is not UTF-8
//! (any producer can send one) would panic the source thread, and again
//! after every restart. Names are read here as bytes through librdkafka's
//! C API and converted lossily (invalid sequences become U+FFFD), which is
//! what plugins and dead letters see; values stay bytes.

use std::ffi::CStr;

use rdkafka::bindings as rd;
use rdkafka::message::BorrowedMessage;

/// A record's headers as (lossy UTF-8 name, value) pairs, in order.
pub fn read_headers(message: &BorrowedMessage<'_>) -> Vec<(String, Option<Vec<u8>>)> {
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `message.ptr()` is a live message owned by `message` for
    // this call. On success `headers` points into that message (librdkafka
    // keeps ownership; we never free it) and stays valid as long as the
    // message, which outlives this function's reads.
    let err = unsafe { rd::rd_kafka_message_headers(message.ptr(), &mut headers) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
        return Vec::new(); // RD_KAFKA_RESP_ERR__NOENT: no headers
    }
    // SAFETY: `headers` is the message's valid header list (see above).
    let count = unsafe { rd::rd_kafka_header_cnt(headers) };
    (0..count)
        .filter_map(|index| read_header(headers, index))
        .collect()
}

fn read_header(
    headers: *const rd::rd_kafka_headers_t,
    index: usize,
) -> Option<(String, Option<Vec<u8>>)> {
    let mut name: *const std::os::raw::c_char = std::ptr::null();
    let mut value: *const std::os::raw::c_void = std::ptr::null();
    let mut size = 0usize;
    // SAFETY: `headers` is valid and `index < count`; librdkafka writes a
    // pointer to its NUL-terminated copy of the name and to the value
    // (`size` bytes, or null for a null value), both owned by the list.
    let err =
        unsafe { rd::rd_kafka_header_get_all(headers, index, &mut name, &mut value, &mut size) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
        return None;
    }
    // SAFETY: `name` is non-null and NUL-terminated (librdkafka stores
    // header names as C strings).
    let name = unsafe { CStr::from_ptr(name) }.to_bytes();
    let value = (!value.is_null()).then(|| {
        // SAFETY: a non-null value points to `size` bytes owned by the list.
        unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
    });
    Some((String::from_utf8_lossy(name).into_owned(), value))
}
