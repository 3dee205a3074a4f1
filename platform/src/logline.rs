//! The text log line, written directly. tracing-subscriber's default ("full") format writes
//! each piece of a line through `Display` wrappers that exist for colour codes (a bold span
//! name, a dimmed colon, a padded level) and formats the timestamp with a dozen padded
//! integer formats. Every call writes an access line, so that showed in the profile of every
//! call. [`PlainFull`] writes the same bytes without those layers; with colour codes (a
//! terminal), and for records bridged from the `log` crate, it hands the event to the default
//! format, unchanged (docs/decisions/plain-log-line.md). [`PlainFields`] does the same for
//! the `name=value` fields of spans and events.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::{RecordFields, VisitOutput as _};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Format, Full, Writer};
use tracing_subscriber::fmt::time::FormatTime as _;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// tracing-subscriber's full text format, byte for byte: `2026-11-28T14:00:00.123456Z  INFO
/// rpc{method=... latency_us=123 code="OK"}: platform::rpc: rpc finished`.
#[derive(Debug, Default)]
pub struct PlainFull {
    full: Format<Full>,
}

impl<S, N> FormatEvent<S, N> for PlainFull
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // A `log` record's target and location are fields the default format unpacks.
        if writer.has_ansi_escapes() || meta.fields().field("log.target").is_some() {
            return self.full.format_event(ctx, writer, event);
        }
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_char(' ')?;
        writer.write_str(level_str(meta.level()))?;
        writer.write_char(' ')?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    writer.write_char('{')?;
                    writer.write_str(fields)?;
                    writer.write_char('}')?;
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// tracing-subscriber's `DefaultFields`, byte for byte: `name=value` pairs separated by
/// spaces. The default writes each name and each `=` through a colour-code wrapper, even with
/// colour off; an RPC's span formats six fields and its access line two, on every call. This
/// writes a plain field (not `message`, not an error, not `log.` metadata) directly and hands
/// every other field, and everything when colour is on, to the default visitor, which escapes
/// what it escapes (docs/decisions/plain-log-line.md).
#[derive(Debug, Default)]
pub struct PlainFields {
    default: DefaultFields,
}

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return self.default.format_fields(writer, fields);
        }
        let mut visitor = PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    /// Nothing written yet: the next field needs no separating space.
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Lets tracing-subscriber's own visitor write this one field.
    fn by_default(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut default = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut default);
        self.result = default.finish();
        // The default writes nothing for `log.` metadata, and pads before anything else.
        self.is_empty = false;
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "message" {
            self.by_default(|default| default.record_str(field, value));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        self.by_default(|default| default.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if name == "message" || name.starts_with("log.") {
            let empty = self.is_empty;
            self.by_default(|default| default.record_debug(field, value));
            // Metadata writes nothing: still empty if it was.
            self.is_empty = empty && name != "message";
            return;
        }
        if self.is_empty {
            self.is_empty = false;
        } else if let Err(e) = self.writer.write_char(' ') {
            self.result = Err(e);
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self
            .writer
            .write_str(name)
            .and_then(|()| self.writer.write_char('='))
            .and_then(|()| write!(self.writer, "{value:?}"));
    }
}

/// The level as the default format pads it (five characters).
fn level_str(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// Seconds from the epoch to the end of 9999 (a four-digit year).
const LAST_FOUR_DIGIT_SECOND: u64 = 253_402_300_799;

/// `now` as RFC 3339 UTC with microseconds, `2026-11-28T14:00:00.123456Z`, as
/// tracing-subscriber's `SystemTime` timer writes it. A clock before 1970 or after 9999 (which
/// that timer writes with a sign) is left to that timer, which reads the clock itself.
fn write_timestamp(writer: &mut Writer<'_>, now: SystemTime) -> fmt::Result {
    let since_epoch = match now.duration_since(UNIX_EPOCH) {
        Ok(since) if since.as_secs() <= LAST_FOUR_DIGIT_SECOND => since,
        _ => return tracing_subscriber::fmt::time::SystemTime.format_time(writer),
    };
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let mut line = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut line[0..4], u64::from(year));
    put_digits(&mut line[5..7], u64::from(month));
    put_digits(&mut line[8..10], u64::from(day));
    put_digits(&mut line[11..13], of_day / 3_600);
    put_digits(&mut line[14..16], of_day / 60 % 60);
    put_digits(&mut line[17..19], of_day % 60);
    put_digits(&mut line[20..26], u64::from(since_epoch.subsec_micros()));
    writer.write_str(std::str::from_utf8(&line).map_err(|_| fmt::Error)?)
}

/// Writes `value`'s last `digits.len()` decimal digits into `digits`, zero-padded.
fn put_digits(digits: &mut [u8], mut value: u64) {
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// The proleptic Gregorian (year, month, day) of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    // Counted from 0000-03-01, so that a leap day ends its year.
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    // Days up to the end of 9999 give a four-digit year, two-digit month and day.
    (year as u32, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
            String::from_utf8(bytes).expect("log lines are UTF-8")
        }
    }

    /// The lines a subscriber writes for the same spans and events: an event outside any
    /// span, nested spans with fields recorded after they were created, an empty span, a
    /// warning with fields and quoting, and another target.
    fn emit<Sub: Subscriber + Send + Sync + 'static>(subscriber: Sub) {
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("serving");
            let rpc = tracing::info_span!(
                "rpc",
                method = %"/billing.v1.Billing/GetSubscription",
                request_id = %"0f1e2d3c",
                directory_id = tracing::field::Empty,
                code = tracing::field::Empty,
            );
            let _rpc = rpc.enter();
            tracing::Span::current().record("directory_id", "d-1");
            let inner = tracing::debug_span!("inner");
            let _inner = inner.enter();
            tracing::warn!(error = %"a \"quoted\" error", attempt = 2_u32, "retrying");
            drop(_inner);
            rpc.record("code", "OK");
            tracing::info!(target: "access", latency_us = 123_u64, "rpc finished");
            tracing::error!(answer = 42, flag = true, "no message fields = {}", 7);
            // What the default visitor does itself: an error and its sources, escape codes in
            // a message, a raw identifier, `log` metadata between fields.
            let cause = std::io::Error::other("disk \x1b[31mfull");
            let error = anyhow::Error::new(cause).context("writing the batch");
            let error: &(dyn std::error::Error + 'static) = error.as_ref();
            tracing::warn!(error, r#type = "batch", "failed: \x1b[2J{}", "cleared?");
            tracing::info!(log.target = "bridged", log.line = 7_u32, after = 1_u8);
            tracing::info!(log.module_path = "first", only = "metadata before it");
        });
    }

    fn lines_of(plain: bool) -> String {
        let lines = Lines::default();
        let writer = {
            let lines = lines.clone();
            move || lines.clone()
        };
        let builder = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_writer(writer);
        if plain {
            emit(
                builder
                    .event_format(PlainFull::default())
                    .fmt_fields(PlainFields::default())
                    .finish(),
            );
        } else {
            emit(builder.finish());
        }
        lines.text()
    }

    #[test]
    fn lines_match_the_default_format_byte_for_byte_after_the_timestamp() {
        let (ours, default) = (lines_of(true), lines_of(false));
        assert_eq!(ours.lines().count(), 7, "{ours}");
        assert_eq!(ours.lines().count(), default.lines().count());
        for (ours, default) in ours.lines().zip(default.lines()) {
            let (our_time, our_rest) = ours.split_at(27);
            let (default_time, default_rest) = default.split_at(27);
            assert_eq!(our_rest, default_rest);
            // Both are the same shape; the times differ only by the test's own run time.
            assert_eq!(our_time.len(), default_time.len());
            assert_eq!(
                &our_time[..11],
                &default_time[..11],
                "same day (test ran at midnight?)"
            );
            for (i, (a, b)) in our_time.bytes().zip(default_time.bytes()).enumerate() {
                assert_eq!(a.is_ascii_digit(), b.is_ascii_digit(), "position {i}");
            }
        }
        assert!(ours.contains(
            "rpc{method=/billing.v1.Billing/GetSubscription request_id=0f1e2d3c directory_id=\"d-1\" code=\"OK\"}: access: rpc finished latency_us=123"
        ), "{ours}");
    }

    /// Formats `at` alone.
    fn timestamp(at: SystemTime) -> String {
        let mut text = String::new();
        write_timestamp(&mut Writer::new(&mut text), at).expect("formats");
        text
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            timestamp(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_795_859_999, 999_999), "2026-11-28T09:59:59.999999Z");
        assert_eq!(at(4_107_542_400, 120_000), "2100-03-01T00:00:00.120000Z");
        assert_eq!(at(LAST_FOUR_DIGIT_SECOND, 0), "9999-12-31T23:59:59.000000Z");
        // Past four-digit years, the default timer takes over, and writes the clock's time.
        let fallback = at(LAST_FOUR_DIGIT_SECOND + 1, 0);
        let now = timestamp(SystemTime::now());
        assert_eq!((fallback.len(), &fallback[..4]), (now.len(), &now[..4]));
    }

    #[test]
    fn every_day_to_9999_gets_its_calendar_date() {
        let (mut year, mut month, mut day) = (1970_u32, 1_u32, 1_u32);
        let leap =
            |y: u32| y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
        for days in 0..=LAST_FOUR_DIGIT_SECOND / 86_400 {
            assert_eq!(civil_from_days(days), (year, month, day), "day {days}");
            let length = match month {
                2 if leap(year) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            day += 1;
            if day > length {
                (day, month) = (1, month + 1);
                if month > 12 {
                    (month, year) = (1, year + 1);
                }
            }
        }
        assert_eq!((year, month, day), (10_000, 1, 1));
    }
}
