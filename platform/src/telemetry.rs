//! The services' `tracing` set-up: human-readable or JSON lines, written by [`crate::logs`]'s
//! thread, with RPC spans whose late-recorded fields are appended cheaply.

/// Installs the global `tracing` subscriber: human-readable lines, or one JSON object per line.
/// The filter comes from `RUST_LOG` (default `info`).
///
/// Lines go to stderr through [`crate::logs`]: a thread of their own writes them in batches,
/// so a call never waits on a `write`, and a stalled sink makes the service drop lines
/// (counted), never calls. Keep the guard until the process ends; dropping it writes what is
/// buffered, waiting for that at most a second.
pub fn init_tracing(json: bool) -> crate::logs::LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = crate::logs::start(std::io::stderr(), crate::logs::BUFFER_LIMIT);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only on a terminal: a log file or collector gets plain text.
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = if json {
        builder.json().fmt_fields(JsonSpanFields).try_init()
    } else {
        builder
            .event_format(crate::logline::PlainFull::default())
            .fmt_fields(crate::logline::PlainFields::default())
            .try_init()
    };
    guard
}

/// A span's fields as one JSON object, as tracing-subscriber's `JsonFields` writes them, but a
/// field recorded later (`Span::record`: an RPC's directory, code and latency) is appended to
/// the object instead of merged into it. `JsonFields` parses the whole object back into a map
/// and writes it again on every record, three times per call here. A key recorded twice
/// appears twice in the stored object; the JSON event formatter parses that object into a map
/// for each line it writes, where the later value wins, as it did with `JsonFields`. So the
/// object grows with every record: fine for an RPC's span, recorded three times; a long-lived
/// span recorded in a loop would need `JsonFields` (docs/decisions/json-span-fields.md).
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonSpanFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        tracing_subscriber::fmt::format::JsonFields::new().format_fields(writer, fields)
    }

    fn add_fields(
        &self,
        current: &'writer mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        let mut more = String::new();
        self.format_fields(
            tracing_subscriber::fmt::format::Writer::new(&mut more),
            fields,
        )?;
        current.fields = append_json_object(std::mem::take(&mut current.fields), &more);
        Ok(())
    }
}

/// `{"a":1}` and `{"b":2}` as `{"a":1,"b":2}`; either may be empty or `{}`.
fn append_json_object(mut object: String, more: &str) -> String {
    let Some(members) = more
        .strip_prefix('{')
        .and_then(|m| m.strip_suffix('}'))
        .filter(|m| !m.is_empty())
    else {
        return object;
    };
    match object.strip_suffix('}').map(str::len) {
        Some(head) if head > 1 => {
            object.truncate(head);
            object.push(',');
            object.push_str(members);
            object.push('}');
            object
        }
        _ => more.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn json_objects_are_appended() {
        let cases = [
            (r#"{"a":1}"#, r#"{"b":"x"}"#, r#"{"a":1,"b":"x"}"#),
            (r#"{"a":1}"#, "{}", r#"{"a":1}"#),
            (r#"{"a":1}"#, "", r#"{"a":1}"#),
            ("{}", r#"{"b":2}"#, r#"{"b":2}"#),
            ("", r#"{"b":2}"#, r#"{"b":2}"#),
            (
                r#"{"a":1}"#,
                r#"{"a":2,"c":true}"#,
                r#"{"a":1,"a":2,"c":true}"#,
            ),
        ];
        for (object, more, expected) in cases {
            assert_eq!(append_json_object(object.to_owned(), more), expected);
        }
    }

    /// One JSON log line: a span with fields given at its start and recorded later (one of
    /// them twice), and an event inside it, written with the given span-field formatter.
    fn json_line<N>(fields: N) -> serde_json::Value
    where
        N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .fmt_fields(fields)
            .with_writer(move || SharedSink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "rpc",
                method = "/m",
                request_id = "r \"1\"",
                directory_id = tracing::field::Empty,
                code = tracing::field::Empty,
                latency_us = tracing::field::Empty,
            );
            span.record("directory_id", "d-1");
            span.record("code", "UNAVAILABLE");
            span.record("latency_us", 1234_u64);
            span.record("code", "OK");
            let _entered = span.enter();
            tracing::info!(answer = 42, "rpc finished");
        });
        let bytes = out.lock().map(|b| b.clone()).unwrap_or_default();
        let line = String::from_utf8(bytes).expect("utf-8");
        serde_json::from_str(line.trim()).expect("one JSON line")
    }

    struct SharedSink(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The appended span fields give the same log line as tracing-subscriber's own JSON
    /// fields (but for the timestamp), a field recorded twice included.
    #[test]
    fn json_span_fields_log_what_json_fields_log() {
        let mut ours = json_line(JsonSpanFields);
        let mut theirs = json_line(tracing_subscriber::fmt::format::JsonFields::new());
        for line in [&mut ours, &mut theirs] {
            if let Some(line) = line.as_object_mut() {
                line.remove("timestamp");
            }
        }
        assert_eq!(ours, theirs);
        assert_eq!(ours["span"]["code"], "OK", "{ours}");
        assert_eq!(ours["span"]["latency_us"], 1234, "{ours}");
        assert_eq!(ours["span"]["directory_id"], "d-1", "{ours}");
        assert_eq!(ours["span"]["request_id"], "r \"1\"", "{ours}");
        assert_eq!(ours["spans"][0]["code"], "OK", "{ours}");
        assert_eq!(ours["fields"]["answer"], 42, "{ours}");
    }
}
