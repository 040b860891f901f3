//! The seed's JSON log line: one object per event with `ts` (RFC 3339, milliseconds, UTC),
//! `level` (lowercase), `svc` (the binary's name), `msg`, then the event's own fields
//! (`tenant_id`, `trace_id`, `model`, `cost`, …) and the fields of the spans it happened in
//! (innermost wins), plus `target`.
//!
//! ```json
//! {"ts":"2026-03-18T10:00:00.123Z","level":"info","svc":"aigw-billing","msg":"…","tenant_id":"7"}
//! ```

use std::fmt;

use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    fmt::{
        FmtContext, FormatEvent, FormattedFields,
        format::{JsonFields, Writer},
    },
    registry::LookupSpan,
};

/// The formatter; `svc` names the service in every line.
#[derive(Debug, Clone)]
pub struct SeedJson {
    pub svc: String,
}

impl SeedJson {
    /// Named after the running binary (`aigw-billing`, …).
    pub fn for_this_process() -> Self {
        let svc = std::env::args()
            .next()
            .and_then(|p| {
                std::path::Path::new(&p)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "aigw".to_owned());
        Self { svc }
    }

    /// The service name on each line (the binary's name).
    pub fn service(&self) -> &str {
        &self.svc
    }
}

/// Collects an event's fields as JSON values.
struct Visitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, value.into());
    }
}

impl Visitor<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        let name = match field.name() {
            "message" => "msg",
            n => n,
        };
        self.0.insert(name.to_owned(), value);
    }
}

/// UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ`, without a date library.
pub fn rfc3339_millis(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

impl<S> FormatEvent<S, JsonFields> for SeedJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let meta = event.metadata();
        let mut fields = Map::new();
        // Span fields, outermost first, so inner spans and the event itself win.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<JsonFields>>()
                    && let Ok(Value::Object(m)) = serde_json::from_str::<Value>(f)
                {
                    fields.extend(m);
                }
            }
        }
        event.record(&mut Visitor(&mut fields));
        let msg = fields.remove("msg").unwrap_or_default();
        // The seed's keys first, in its order; then the fields; then where it came from.
        let mut line = String::with_capacity(256);
        let mut put = |key: &str, value: &Value| {
            line.push(if line.is_empty() { '{' } else { ',' });
            line.push_str(&Value::String(key.to_owned()).to_string());
            line.push(':');
            line.push_str(&value.to_string());
        };
        put("ts", &rfc3339_millis(now).into());
        put("level", &meta.level().as_str().to_ascii_lowercase().into());
        put("svc", &self.svc.clone().into());
        put("msg", &msg);
        for (k, v) in &fields {
            put(k, v);
        }
        put("target", &meta.target().into());
        line.push('}');
        writeln!(writer, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        use std::time::Duration;
        assert_eq!(rfc3339_millis(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(Duration::from_millis(1_773_828_000_123)),
            "2026-03-18T10:00:00.123Z"
        );
        assert_eq!(
            rfc3339_millis(Duration::from_hours(264_384)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn a_line_has_the_seed_fields() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(SeedJson {
                    svc: "billing".into(),
                })
                .with_writer(move || out.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("batch", trace_id = "a1b2c3d4e5f6");
            let _g = span.enter();
            tracing::info!(
                tenant_id = "t_001",
                tokens = 230u64,
                "quota deducted successfully"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["level"], "info");
        assert_eq!(v["svc"], "billing");
        assert_eq!(v["msg"], "quota deducted successfully");
        assert_eq!(v["trace_id"], "a1b2c3d4e5f6");
        assert_eq!(v["tenant_id"], "t_001");
        assert_eq!(v["tokens"], 230);
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        assert!(text.starts_with(r#"{"ts":"#), "{text}");
        assert!(
            text.contains(r#","level":"info","svc":"billing","msg":"#),
            "{text}"
        );
    }
}
