//! How span and event fields are written into log lines: as
//! tracing-subscriber's own text and JSON formats do, minus the fields only
//! OpenTelemetry reads.
//!
//! The `fmt` layer formats a span's fields when the span opens, and again
//! on every `record`, whether or not any line is ever logged inside it. Every
//! RPC opens `grpc.request` with eight fields and records two or three more
//! later, so that formatting ran on every call: about 11,000 instructions
//! per authenticated call in text (callgrind), and in JSON each `record`
//! also parsed and re-serialised the span's fields so far. Five of those
//! fields are for the trace exporter only (span name, kind and status, which
//! tracing-opentelemetry reads from `otel.*`, plus `rpc.system` and the
//! status code, which are only known when the span is about to close, after
//! the last line it could carry). Log lines keep the fields a reader needs:
//! `rpc.service`, `rpc.method` and `igny8.account_id`.
//!
//! The fields that remain are written directly: in text, plain strings and
//! integers without `write!` and `str`'s `Debug` (which escapes character
//! by character); in JSON, members straight into the line instead of a map
//! of `serde_json::Value`s. The lines are the same (tests compare them with
//! tracing-subscriber's own formatters).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::{RecordFields, VisitOutput},
    fmt::{
        FormatFields, FormattedFields,
        format::{DefaultVisitor, Writer},
    },
};

/// Whether a field belongs in log lines.
fn logged(field: &Field) -> bool {
    let name = field.name();
    !(name.starts_with("otel.") || name == "rpc.system" || name == "rpc.grpc.status_code")
}

/// Passes the [`logged`] fields on to `V`.
struct Logged<'a, V>(&'a mut V);

/// Forwards each `record_*` method to `V` for [`logged`] fields only.
macro_rules! forward_logged {
    ($($method:ident($value:ty)),* $(,)?) => {
        $(
            fn $method(&mut self, field: &Field, value: $value) {
                if logged(field) {
                    self.0.$method(field, value);
                }
            }
        )*
    };
}

impl<V: Visit> Visit for Logged<'_, V> {
    forward_logged!(
        record_f64(f64),
        record_i64(i64),
        record_u64(u64),
        record_i128(i128),
        record_u128(u128),
        record_bool(bool),
        record_str(&str),
        record_bytes(&[u8]),
        record_error(&(dyn std::error::Error + 'static)),
        record_debug(&dyn fmt::Debug),
    );
}

/// Whether any of `fields` is [`logged`], without formatting any value.
fn any_logged(fields: &impl RecordFields) -> bool {
    struct Any(bool);
    impl Visit for Any {
        fn record_debug(&mut self, field: &Field, _: &dyn fmt::Debug) {
            self.0 |= logged(field);
        }
    }
    let mut any = Any(false);
    fields.record(&mut any);
    any.0
}

/// tracing-subscriber's text format (`DefaultFields`), [`logged`] fields only.
#[derive(Debug, Default)]
pub(crate) struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor::new(writer, true);
        fields.record(&mut Logged(&mut visitor));
        visitor.result
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let empty = current.fields.is_empty();
        let mut visitor = TextVisitor::new(current.as_writer(), empty);
        fields.record(&mut Logged(&mut visitor));
        visitor.result
    }
}

/// Writes exactly what [`DefaultVisitor`] writes: plain string and integer
/// fields directly, everything else (messages, `r#` names, styled output,
/// values that need escaping, other types) through a `DefaultVisitor`.
struct TextVisitor<'a> {
    writer: Writer<'a>,
    /// Nothing written yet: the next field needs no separating space.
    is_empty: bool,
    result: fmt::Result,
}

impl<'a> TextVisitor<'a> {
    fn new(writer: Writer<'a>, is_empty: bool) -> Self {
        Self {
            writer,
            is_empty,
            result: Ok(()),
        }
    }

    /// Whether `field` is written as `name=value` with nothing around it:
    /// no colours, and a name `DefaultVisitor` gives no special treatment.
    fn plain_name(&self, field: &Field) -> bool {
        let name = field.name();
        !self.writer.has_ansi_escapes()
            && name != "message"
            && !name.starts_with("r#")
            && !name.starts_with("log.")
    }

    /// Writes ` name=` (no space first) and then `value`'s parts.
    fn write_plain(&mut self, field: &Field, value: &[&str]) {
        if self.result.is_err() {
            return;
        }
        let first = std::mem::replace(&mut self.is_empty, false);
        let writer = &mut self.writer;
        self.result = (|| {
            if !first {
                writer.write_char(' ')?;
            }
            writer.write_str(field.name())?;
            writer.write_char('=')?;
            value.iter().try_for_each(|part| writer.write_str(part))
        })();
    }

    /// Has a [`DefaultVisitor`] write the field.
    fn delegate(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        // It writes every field except tracing-log's `log.*` metadata.
        if !field.name().starts_with("log.") {
            self.is_empty = false;
        }
    }
}

/// Whether `str`'s `Debug` writes `value` unchanged between quotes:
/// printable ASCII without `"` or `\`.
fn needs_no_escaping(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.plain_name(field) && needs_no_escaping(value) {
            self.write_plain(field, &["\"", value, "\""]);
        } else {
            self.delegate(field, |v| v.record_str(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.plain_name(field) {
            self.write_plain(field, &[itoa::Buffer::new().format(value)]);
        } else {
            self.delegate(field, |v| v.record_i64(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.plain_name(field) {
            self.write_plain(field, &[itoa::Buffer::new().format(value)]);
        } else {
            self.delegate(field, |v| v.record_u64(field, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.delegate(field, |v| v.record_debug(field, value));
    }
}

/// tracing-subscriber's JSON format (`JsonFields`), [`logged`] fields only.
/// Fields recorded later are appended to the object already written rather
/// than parsed and written again.
#[derive(Debug, Default)]
pub(crate) struct JsonFields;

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        JsonObject::write(&mut writer, |visitor| fields.record(&mut Logged(visitor)))
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if !any_logged(fields) {
            return Ok(());
        }
        let mut added = String::new();
        JsonObject::write(&mut added, |visitor| fields.record(&mut Logged(visitor)))?;
        merge_json_objects(&mut current.fields, &added);
        Ok(())
    }
}

/// Writes one JSON object with the members `JsonVisitor` would write (the
/// same names and values), straight into the output: `JsonVisitor` first
/// builds a map of `serde_json::Value`s, allocating every string. Members
/// come in the order recorded rather than sorted by name.
struct JsonObject<'a> {
    out: &'a mut dyn fmt::Write,
    first: bool,
    result: fmt::Result,
}

impl JsonObject<'_> {
    /// `{`, the members `record` visits, `}`.
    fn write(out: &mut dyn fmt::Write, record: impl FnOnce(&mut JsonObject<'_>)) -> fmt::Result {
        out.write_char('{')?;
        let mut object = JsonObject {
            out,
            first: true,
            result: Ok(()),
        };
        record(&mut object);
        object.result?;
        object.out.write_char('}')
    }

    /// `,"name":` and then the value `write_value` writes.
    fn member(&mut self, name: &str, write_value: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let first = std::mem::replace(&mut self.first, false);
        let out = &mut *self.out;
        self.result = (|| {
            if !first {
                out.write_char(',')?;
            }
            json_string(out, name)?;
            out.write_char(':')?;
            write_value(out)
        })();
    }

    /// A value as serde_json writes it.
    fn serialized(&mut self, name: &str, value: serde_json::Value) {
        self.member(name, |out| out.write_str(&value.to_string()));
    }
}

/// `value` as a JSON string, escaped as serde_json escapes it.
fn json_string(out: &mut dyn fmt::Write, value: &str) -> fmt::Result {
    // serde_json escapes control characters, `"` and `\` only.
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.write_char('"')?;
        out.write_str(value)?;
        out.write_char('"')
    } else {
        out.write_str(&serde_json::Value::from(value).to_string())
    }
}

impl Visit for JsonObject<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.serialized(field.name(), serde_json::Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field.name(), |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field.name(), |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field.name(), |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field.name(), |out| json_string(out, value));
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.serialized(field.name(), serde_json::Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // As `JsonVisitor`: tracing-log's `log.*` metadata is left out, and
        // a raw identifier loses its `r#`.
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.member(name, |out| json_string(out, &format!("{value:?}")));
    }
}

/// Appends the members of the JSON object `added` to the JSON object
/// `current` (either may be empty text or `{}`). A name recorded twice
/// appears twice; readers of the line (the JSON event format included) keep
/// the last.
fn merge_json_objects(current: &mut String, added: &str) {
    let added_members = added
        .strip_prefix('{')
        .and_then(|a| a.strip_suffix('}'))
        .unwrap_or("");
    if added_members.is_empty() {
        return;
    }
    let current_members = current
        .strip_prefix('{')
        .and_then(|c| c.strip_suffix('}'))
        .unwrap_or("");
    if current_members.is_empty() {
        current.clear();
        current.push_str(added);
        return;
    }
    current.pop();
    current.push(',');
    current.push_str(added_members);
    current.push('}');
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use tracing::field::Empty;
    use tracing_subscriber::{fmt::MakeWriter, prelude::*};

    use super::*;

    /// Collects what the `fmt` layer writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// The request span as `rpc.rs` opens and records it, with one line
    /// logged inside it after the account is known.
    fn log_inside_a_request_span() {
        let span = tracing::info_span!(
            "grpc.request",
            otel.name = "pkg.Service/Method",
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = "pkg.Service",
            rpc.method = "Method",
            rpc.grpc.status_code = Empty,
            igny8.account_id = Empty,
        );
        span.record("igny8.account_id", 42);
        span.in_scope(|| tracing::warn!(error = "quote \" and\nnewline", "inside"));
        span.record("rpc.grpc.status_code", 0);
        span.record("otel.status_code", "OK");
        span.in_scope(|| tracing::warn!("after the status"));
    }

    #[test]
    fn text_lines_keep_the_request_fields_without_the_exporters() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(TextFields)
                .with_ansi(false)
                .with_writer(lines.clone()),
        );
        tracing::subscriber::with_default(subscriber, log_inside_a_request_span);
        let text = lines.text();
        let first = text.lines().next().unwrap();
        assert!(
            first.contains(
                "grpc.request{rpc.service=\"pkg.Service\" rpc.method=\"Method\" igny8.account_id=42}"
            ),
            "{text}"
        );
        // Event fields are escaped as before.
        assert!(first.contains(r#"error="quote \" and\nnewline""#), "{text}");
        assert!(!text.contains("otel."), "{text}");
        assert!(!text.contains("rpc.system"), "{text}");
        assert!(!text.contains("status_code"), "{text}");
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    /// Spans and events with every kind of field the visitors treat
    /// specially.
    fn emit_every_kind_of_field() {
        {
            let span = tracing::info_span!(
                "s",
                a = "plain",
                b = 7i64,
                c = 7u64,
                r#type = "kind",
                d = "needs \"escaping\"\n",
                e = "ünïcode",
                f = Empty,
                g = true,
                h = 1.5,
                i = ?vec![1],
                j = "",
                log.skipped = ?2,
            );
            span.record("f", -3i64);
            span.record("b", i64::MIN);
            let _entered = span.enter();
            let err = std::io::Error::other("boom");
            tracing::warn!(
                log.target = "t",
                x = "plain",
                y = u64::MAX,
                z = -1i64,
                w = "tab\there\u{1b}[31m",
                err = &err as &(dyn std::error::Error + 'static),
                "message with \"quotes\""
            );
            tracing::warn!(message = "as a field", k = "back\\slash");
        }
    }

    /// [`emit_every_kind_of_field`] through `TextFields` or through
    /// tracing-subscriber's own `DefaultFields`.
    fn text_through(ours: bool, ansi: bool) -> String {
        let emit = emit_every_kind_of_field;
        let lines = Lines::default();
        let layer = tracing_subscriber::fmt::layer()
            .without_time()
            .with_ansi(ansi)
            .with_writer(lines.clone());
        if ours {
            let layer = layer.fmt_fields(TextFields);
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        } else {
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        }
        lines.text()
    }

    #[test]
    fn text_fields_write_what_default_fields_write() {
        for ansi in [false, true] {
            let ours = text_through(true, ansi);
            assert_eq!(ours, text_through(false, ansi), "ansi {ansi}");
            assert_eq!(ours.lines().count(), 2, "{ours}");
        }
        let plain = text_through(true, false);
        assert!(
            plain.contains(r#"s{a="plain" b=7 c=7 type="kind" d="needs"#),
            "{plain}"
        );
        assert!(
            plain.contains(r#"j="" f=-3 b=-9223372036854775808}"#),
            "{plain}"
        );
    }

    #[test]
    fn json_lines_keep_the_request_fields_without_the_exporters() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .fmt_fields(JsonFields)
                .with_writer(lines.clone()),
        );
        tracing::subscriber::with_default(subscriber, log_inside_a_request_span);
        let text = lines.text();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(parsed.len(), 2, "{text}");
        for line in &parsed {
            assert_eq!(
                line["span"],
                serde_json::json!({
                    "name": "grpc.request",
                    "rpc.service": "pkg.Service",
                    "rpc.method": "Method",
                    "igny8.account_id": 42,
                }),
                "{text}"
            );
        }
        assert_eq!(parsed[0]["fields"]["error"], "quote \" and\nnewline");
    }

    /// [`emit_every_kind_of_field`] through `JsonFields` or through
    /// tracing-subscriber's own, each line parsed.
    fn json_through(ours: bool) -> Vec<serde_json::Value> {
        let lines = Lines::default();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .with_span_list(true)
            .without_time()
            .with_writer(lines.clone());
        if ours {
            let layer = layer.fmt_fields(JsonFields);
            tracing::subscriber::with_default(
                tracing_subscriber::registry().with(layer),
                emit_every_kind_of_field,
            );
        } else {
            tracing::subscriber::with_default(
                tracing_subscriber::registry().with(layer),
                emit_every_kind_of_field,
            );
        }
        lines
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }

    #[test]
    fn json_fields_write_what_tracing_subscriber_writes() {
        let ours = json_through(true);
        assert_eq!(ours, json_through(false));
        assert_eq!(ours.len(), 2);
        let span = &ours[0]["span"];
        assert_eq!(span["a"], "plain");
        assert_eq!(span["b"], i64::MIN, "recorded last");
        assert_eq!(span["d"], "needs \"escaping\"\n");
        assert_eq!(span["type"], "kind");
        assert_eq!(span["i"], "[1]");
        assert!(span.get("log.skipped").is_none());
    }

    #[test]
    fn json_objects_merge() {
        let cases = [
            ("", "{}", ""),
            ("", r#"{"a":1}"#, r#"{"a":1}"#),
            ("{}", r#"{"a":1}"#, r#"{"a":1}"#),
            (r#"{"a":1}"#, "{}", r#"{"a":1}"#),
            (r#"{"a":1}"#, r#"{"b":"}"}"#, r#"{"a":1,"b":"}"}"#),
            (
                r#"{"a":1,"b":2}"#,
                r#"{"c":3,"d":4}"#,
                r#"{"a":1,"b":2,"c":3,"d":4}"#,
            ),
        ];
        for (current, added, merged) in cases {
            let mut s = current.to_owned();
            merge_json_objects(&mut s, added);
            assert_eq!(s, merged, "{current} + {added}");
        }
    }
}
