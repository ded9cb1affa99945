//! Time windows of an aggregation (`window = { kind = ..., ... }`): the
//! spec, its validation and its arithmetic — which windows a record's event
//! time falls in, when a window closes, when it may be deleted.
//!
//! Windows follow Kafka Streams' semantics: tumbling and hopping windows are
//! aligned to the Unix epoch and cover `[start, end)` in milliseconds; a
//! partition's *stream time* is the largest event time seen in it; a window
//! is closed once stream time ≥ end + grace, and a record whose windows are
//! all closed is late. A session is per key: records less than `gap` apart
//! share one, `[first record, last record]`; it closes once stream time >
//! its last record + gap + grace.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written like `500ms`, `10s`, `1m`, `2h` or `1d`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(Duration);

impl Span {
    pub fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    /// In milliseconds (saturating at `i64::MAX`).
    pub fn millis(self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(Self)
            .map_err(|e| format!("{text:?} is not a duration like 500ms, 10s, 1m, 2h or 1d ({e})"))
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

fn default_retention() -> Span {
    Span(Duration::from_secs(24 * 3600))
}

/// An aggregation's windows, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum WindowConfig {
    /// Back-to-back windows of `size`.
    Tumbling {
        size: Span,
        #[serde(default)]
        grace: Span,
        #[serde(default = "default_retention")]
        retention: Span,
    },
    /// Windows of `size` starting every `advance`: a record is in each
    /// window that covers it.
    Hopping {
        size: Span,
        advance: Span,
        #[serde(default)]
        grace: Span,
        #[serde(default = "default_retention")]
        retention: Span,
    },
    /// Per key, records closer than `gap` to each other form one session.
    Session {
        gap: Span,
        #[serde(default)]
        grace: Span,
        #[serde(default = "default_retention")]
        retention: Span,
    },
}

/// A window: `[start, end)` in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

impl WindowConfig {
    /// Checks the combination, naming the field to fix.
    pub fn check(&self) -> Result<(), String> {
        let positive = |field: &str, span: Span| {
            if span.millis() == 0 {
                Err(format!("`window.{field}` must be more than 0"))
            } else {
                Ok(())
            }
        };
        let (length, length_field) = match *self {
            Self::Tumbling { size, .. } => {
                positive("size", size)?;
                (size, "size")
            }
            Self::Hopping { size, advance, .. } => {
                positive("size", size)?;
                positive("advance", advance)?;
                if advance > size {
                    return Err(format!(
                        "`window.advance` ({advance}) must not be larger than `window.size` ({size}): records between windows would belong to none"
                    ));
                }
                (size, "size")
            }
            Self::Session { gap, .. } => {
                positive("gap", gap)?;
                (gap, "gap")
            }
        };
        let (grace, retention) = (self.grace(), self.retention());
        let needed = length.millis().saturating_add(grace.millis());
        if retention.millis() < needed {
            return Err(format!(
                "`window.retention` ({retention}) must be at least `window.{length_field}` + `window.grace` ({}): a window would be deleted before it closes",
                Span::from_millis(needed as u64)
            ));
        }
        Ok(())
    }

    /// A window's length: `size`, or a session's `gap`.
    pub fn length(&self) -> i64 {
        match *self {
            Self::Tumbling { size, .. } | Self::Hopping { size, .. } => size.millis(),
            Self::Session { gap, .. } => gap.millis(),
        }
    }

    pub fn grace(&self) -> Span {
        match *self {
            Self::Tumbling { grace, .. }
            | Self::Hopping { grace, .. }
            | Self::Session { grace, .. } => grace,
        }
    }

    pub fn retention(&self) -> Span {
        match *self {
            Self::Tumbling { retention, .. }
            | Self::Hopping { retention, .. }
            | Self::Session { retention, .. } => retention,
        }
    }

    /// The tumbling or hopping windows an event at `time` belongs to, in
    /// start order; none for sessions (a session depends on the key's
    /// other records).
    pub fn windows_of(&self, time: i64) -> Vec<Window> {
        let (size, advance) = match *self {
            Self::Tumbling { size, .. } => (size.millis(), size.millis()),
            Self::Hopping { size, advance, .. } => (size.millis(), advance.millis()),
            Self::Session { .. } => return Vec::new(),
        };
        // The last window starting at or before `time`, then back while
        // windows still cover it.
        let last = time - time.rem_euclid(advance);
        let mut windows = Vec::new();
        let mut start = last;
        while start.saturating_add(size) > time {
            windows.push(Window {
                start,
                end: start.saturating_add(size),
            });
            match start.checked_sub(advance) {
                Some(earlier) => start = earlier,
                None => break,
            }
        }
        windows.reverse();
        windows
    }

    /// The window of a stored state: a tumbling or hopping window from its
    /// start, a session from its start and end.
    pub fn window_at(&self, start: i64, session_end: Option<i64>) -> Window {
        match (self, session_end) {
            (Self::Session { .. }, end) => Window {
                start,
                end: end.unwrap_or(start),
            },
            _ => Window {
                start,
                end: start.saturating_add(self.length()),
            },
        }
    }

    /// Whether `window` no longer takes records at this stream time: a
    /// tumbling or hopping window once stream time ≥ end + grace; a
    /// session (whose `end` is its last record's time) once stream time >
    /// end + gap + grace, as in Kafka Streams — no record could join it.
    pub fn closed(&self, window: Window, stream_time: i64) -> bool {
        let grace = self.grace().millis();
        match *self {
            Self::Session { gap, .. } => {
                stream_time
                    > window
                        .end
                        .saturating_add(gap.millis())
                        .saturating_add(grace)
            }
            _ => stream_time >= window.end.saturating_add(grace),
        }
    }

    /// Whether `window` is past retention at this stream time (its state
    /// may be deleted).
    pub fn expired(&self, window: Window, stream_time: i64) -> bool {
        let cutoff = stream_time.saturating_sub(self.retention().millis());
        match self {
            Self::Session { .. } => window.end < cutoff,
            _ => window.end <= cutoff,
        }
    }

    /// Whether `window` overlaps the times `[from, to)` (either side open
    /// when `None`); a session covers its end.
    pub fn overlaps(&self, window: Window, from: Option<i64>, to: Option<i64>) -> bool {
        let last = match self {
            Self::Session { .. } => window.end,
            _ => window.end.saturating_sub(1),
        };
        from.is_none_or(|from| last >= from) && to.is_none_or(|to| window.start < to)
    }

    /// Whether an event at `time` is late for a tumbling or hopping window:
    /// every window it belongs to is closed (`stream_time` includes it).
    /// Sessions decide per key (`apply::session`): a record is late when
    /// the session it would make or join is closed.
    pub fn late(&self, time: i64, stream_time: i64) -> bool {
        self.windows_of(time)
            .into_iter()
            .all(|window| self.closed(window, stream_time))
    }

    /// Whether this is a session window.
    pub fn is_session(&self) -> bool {
        matches!(self, Self::Session { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<WindowConfig, String> {
        #[derive(Deserialize)]
        struct Holder {
            window: WindowConfig,
        }
        let holder: Holder = toml::from_str(text).map_err(|e| e.to_string())?;
        holder.window.check()?;
        Ok(holder.window)
    }

    #[test]
    fn the_issue_examples_parse_with_their_defaults() {
        let tumbling = parse(
            r#"window = { kind = "tumbling", size = "1m", grace = "10s", retention = "24h" }"#,
        )
        .unwrap();
        assert_eq!(tumbling.grace(), Span::from_millis(10_000));
        let hopping =
            parse(r#"window = { kind = "hopping", size = "5m", advance = "1m", grace = "30s" }"#)
                .unwrap();
        assert_eq!(hopping.retention(), Span::from_millis(24 * 3_600_000));
        let session = parse(r#"window = { kind = "session", gap = "30m", grace = "1m" }"#).unwrap();
        assert!(matches!(session, WindowConfig::Session { .. }));
        for (text, ms) in [
            ("500ms", 500),
            ("10s", 10_000),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
        ] {
            assert_eq!(text.parse::<Span>().unwrap().millis(), ms);
        }
    }

    #[test]
    fn bad_combinations_name_the_field() {
        let cases = [
            (
                r#"window = { kind = "tumbling", size = "0s" }"#,
                "`window.size` must be more than 0",
            ),
            (
                r#"window = { kind = "hopping", size = "1m", advance = "2m" }"#,
                "`window.advance` (2m) must not be larger than `window.size` (1m)",
            ),
            (
                r#"window = { kind = "hopping", size = "1m", advance = "0ms" }"#,
                "`window.advance`",
            ),
            (
                r#"window = { kind = "tumbling", size = "1h", grace = "10m", retention = "1h" }"#,
                "`window.retention` (1h) must be at least `window.size` + `window.grace` (1h 10m)",
            ),
            (
                r#"window = { kind = "session", gap = "0s" }"#,
                "`window.gap`",
            ),
            (
                r#"window = { kind = "session", gap = "1d", retention = "1h" }"#,
                "`window.gap` + `window.grace`",
            ),
            (
                r#"window = { kind = "tumbling", size = "1 fortnight" }"#,
                "is not a duration",
            ),
            (r#"window = { kind = "sliding", size = "1m" }"#, "sliding"),
            (
                r#"window = { kind = "tumbling", size = "1m", gap = "1m" }"#,
                "gap",
            ),
        ];
        for (text, wanted) in cases {
            let error = parse(text).expect_err(text);
            assert!(error.contains(wanted), "{text}: {error}");
        }
    }

    #[test]
    fn windows_are_aligned_to_the_epoch_and_close_after_their_grace() {
        let hopping =
            parse(r#"window = { kind = "hopping", size = "5m", advance = "1m", grace = "30s" }"#)
                .unwrap();
        let minute = 60_000;
        let t = 7 * minute + 1_000;
        let starts: Vec<i64> = hopping
            .windows_of(t)
            .iter()
            .map(|w| w.start / minute)
            .collect();
        assert_eq!(starts, [3, 4, 5, 6, 7]);
        let first = hopping.windows_of(t)[0];
        assert_eq!((first.start, first.end), (3 * minute, 8 * minute));
        assert!(!hopping.closed(first, 8 * minute + 29_999));
        assert!(hopping.closed(first, 8 * minute + 30_000));
        // Before the epoch too.
        let tumbling = parse(r#"window = { kind = "tumbling", size = "1m" }"#).unwrap();
        assert_eq!(
            tumbling.windows_of(-1),
            [Window {
                start: -minute,
                end: 0
            }]
        );
        assert!(
            tumbling.late(0, minute),
            "its window [0, 1m) closed at 1m (no grace)"
        );
        assert!(!tumbling.late(minute, minute));
        assert!(tumbling.expired(
            Window {
                start: 0,
                end: minute
            },
            minute + 24 * 60 * minute
        ));
    }

    #[test]
    fn sessions_close_after_their_last_record_plus_gap_and_grace_and_cover_their_end() {
        let session =
            parse(r#"window = { kind = "session", gap = "10s", grace = "5s", retention = "1m" }"#)
                .unwrap();
        // Stored with start 1 000 and end 2 000 (its last record).
        let window = session.window_at(1_000, Some(2_000));
        assert_eq!(
            window,
            Window {
                start: 1_000,
                end: 2_000
            }
        );
        assert!(
            !session.closed(window, 17_000),
            "a record at 12 000 could still join"
        );
        assert!(session.closed(window, 17_001));
        assert!(!session.expired(window, 62_000));
        assert!(session.expired(window, 62_001));
        // A session covers its end; a tumbling window does not.
        assert!(session.overlaps(window, Some(2_000), None));
        assert!(!session.overlaps(window, Some(2_001), None));
        assert!(!session.overlaps(window, None, Some(1_000)));
        let tumbling = parse(r#"window = { kind = "tumbling", size = "1s" }"#).unwrap();
        let second = tumbling.window_at(1_000, None);
        assert_eq!(second.end, 2_000);
        assert!(!tumbling.overlaps(second, Some(2_000), None));
        assert!(tumbling.overlaps(second, Some(1_999), Some(1_001)));
    }

    proptest! {
        /// A record is in exactly the windows that contain it: checked
        /// against every window start near it.
        #[test]
        fn windows_of_is_every_window_containing_the_time(
            time in -10_000_000i64..10_000_000,
            size in 1i64..5_000,
            advance_part in 1i64..5_000,
        ) {
            let advance = advance_part.min(size);
            let config = WindowConfig::Hopping {
                size: Span::from_millis(size as u64),
                advance: Span::from_millis(advance as u64),
                grace: Span::default(),
                retention: Span::from_millis(u64::MAX / 4),
            };
            let got = config.windows_of(time);
            let first = (time - size).div_euclid(advance) * advance;
            let expected: Vec<Window> = (0..)
                .map(|i| first + i * advance)
                .take_while(|&start| start <= time)
                .filter(|&start| start <= time && time < start + size)
                .map(|start| Window { start, end: start + size })
                .collect();
            prop_assert_eq!(got, expected);
        }
    }
}
