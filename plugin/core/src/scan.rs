//! An incremental JSON scanner that keeps only a few small values.
//!
//! It is fed a byte stream in arbitrary chunks (a chunk may end inside a string, a number, an escape
//! or a UTF-8 character) and never holds a document: it tracks the container stack and the current
//! key of each object, and copies out only the values whose path the caller asked for (e.g.
//! `usage`, `message.usage`), each up to [`MAX_CAPTURE`] bytes. Memory is bounded by
//! [`MAX_DEPTH`] × [`MAX_KEY`] + the captures, whatever the response size.
//!
//! A "document" ends whenever a root object closes — the whole body, one element of a root array
//! (Gemini's non-SSE stream), or one SSE event's data.

/// Largest captured value; a larger one is dropped (and reported as oversized).
pub const MAX_CAPTURE: usize = 16 * 1024;
/// Deepest container tracked with its key; deeper levels are only counted.
pub const MAX_DEPTH: usize = 32;
/// Longest key remembered; longer keys never match.
pub const MAX_KEY: usize = 64;
/// Longest path of keys that can be captured.
pub const MAX_PATH: usize = 4;

/// Decides which paths (object keys from the root) to capture.
pub type Wanted = fn(&[&[u8]]) -> bool;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    Object {
        key: Vec<u8>,
        key_ok: bool,
        expecting_key: bool,
    },
    Array,
}

/// A value copied out of a document, with its path of object keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub path: Vec<String>,
    pub raw: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Str {
    No,
    Key,
    Value,
}

#[derive(Debug, Clone)]
struct Active {
    path: Vec<String>,
    /// Stack depth at which the captured value lives (its container, if any, is one deeper).
    depth: usize,
    raw: Vec<u8>,
    oversized: bool,
    scalar: bool,
}

/// The scanner. `wanted` decides which paths to capture.
#[derive(Debug)]
pub struct Scanner {
    stack: Vec<Frame>,
    /// Levels beyond `MAX_DEPTH`.
    overflow: usize,
    string: Str,
    escape: bool,
    /// Inside a scalar (number/true/false/null) that is not being captured.
    active: Option<Active>,
    wanted: Wanted,
    /// A `:` was seen and its value has not started yet.
    pending: bool,
    /// Values completed in the current document.
    captures: Vec<Capture>,
    /// Completed documents, each with its captures.
    documents: Vec<Vec<Capture>>,
    /// Some value was too large to keep.
    pub oversized: bool,
}

impl Scanner {
    pub fn new(wanted: Wanted) -> Self {
        Self {
            stack: Vec::new(),
            overflow: 0,
            string: Str::No,
            escape: false,
            active: None,
            wanted,
            pending: false,
            captures: Vec::new(),
            documents: Vec::new(),
            oversized: false,
        }
    }

    /// Forgets any partial document (an SSE event ended, whatever its data was).
    pub fn reset(&mut self) {
        self.stack.clear();
        self.overflow = 0;
        self.string = Str::No;
        self.escape = false;
        self.active = None;
        self.pending = false;
        self.captures.clear();
    }

    /// Documents completed so far (drains them).
    pub fn take_documents(&mut self) -> Vec<Vec<Capture>> {
        std::mem::take(&mut self.documents)
    }

    fn depth(&self) -> usize {
        self.stack.len() + self.overflow
    }

    /// The keys leading to the value about to start at the current position (at most
    /// [`MAX_PATH`] of them), or `None` when the path runs through a non-root array, an over-long
    /// key, or is deeper. Allocation-free: this runs for every key/value pair.
    fn value_path(&self) -> Option<([&[u8]; MAX_PATH], usize)> {
        if self.overflow > 0 {
            return None;
        }
        let mut path: [&[u8]; MAX_PATH] = [&[]; MAX_PATH];
        let mut len = 0;
        let mut seen_object = false;
        for f in &self.stack {
            match f {
                Frame::Array if seen_object => return None,
                Frame::Array => {}
                Frame::Object { key, key_ok, .. } => {
                    seen_object = true;
                    if !key_ok || len == MAX_PATH {
                        return None;
                    }
                    path[len] = key;
                    len += 1;
                }
            }
        }
        Some((path, len))
    }

    fn finish_capture(&mut self) {
        if let Some(a) = self.active.take() {
            if a.oversized {
                self.oversized = true;
            } else {
                self.captures.push(Capture {
                    path: a.path,
                    raw: a.raw,
                });
            }
        }
    }

    fn push_capture_byte(&mut self, b: u8) {
        if let Some(a) = &mut self.active {
            if a.raw.len() < MAX_CAPTURE {
                a.raw.push(b);
            } else {
                a.oversized = true;
            }
        }
    }

    /// Called when a value starts at the current position (after `:` in an object, or as an array
    /// element / root value).
    fn value_starts(&mut self, scalar: bool) {
        if !std::mem::take(&mut self.pending) || self.active.is_some() {
            return;
        }
        let Some((keys, len)) = self.value_path() else {
            return;
        };
        if !(self.wanted)(&keys[..len]) {
            return;
        }
        let path = keys[..len]
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        self.active = Some(Active {
            path,
            depth: self.depth(),
            raw: Vec::new(),
            oversized: false,
            scalar,
        });
    }

    fn root_closed(&mut self) {
        let doc = std::mem::take(&mut self.captures);
        self.documents.push(doc);
    }

    /// Feeds a chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            // Fast path: the inside of a string value nobody captures (most of a response's bytes:
            // generated text, base64, encrypted reasoning) is skipped up to its next quote or
            // backslash.
            if self.string == Str::Value && self.active.is_none() && !self.escape {
                match chunk[i..].iter().position(|&b| b == b'"' || b == b'\\') {
                    Some(p) => i += p,
                    None => return,
                }
            }
            self.byte(chunk[i]);
            i += 1;
        }
    }

    fn byte(&mut self, b: u8) {
        if self.string != Str::No {
            self.string_byte(b);
            return;
        }
        // A scalar being captured ends at a delimiter or whitespace.
        if let Some(a) = &self.active
            && a.scalar
            && a.depth == self.depth()
            && !a.raw.is_empty()
            && matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n')
        {
            self.finish_capture();
        }
        match b {
            b'"' => {
                let is_key = matches!(
                    self.stack.last(),
                    Some(Frame::Object {
                        expecting_key: true,
                        ..
                    })
                ) && self.overflow == 0;
                if is_key {
                    if let Some(Frame::Object { key, key_ok, .. }) = self.stack.last_mut() {
                        key.clear();
                        *key_ok = true;
                    }
                    self.push_capture_byte(b);
                    self.string = Str::Key;
                } else {
                    self.value_starts(true);
                    self.push_capture_byte(b);
                    self.string = Str::Value;
                }
            }
            b'{' | b'[' => {
                self.value_starts(false);
                self.push_capture_byte(b);
                if self.stack.len() < MAX_DEPTH && self.overflow == 0 {
                    self.stack.push(if b == b'{' {
                        Frame::Object {
                            key: Vec::new(),
                            key_ok: false,
                            expecting_key: true,
                        }
                    } else {
                        Frame::Array
                    });
                } else {
                    self.overflow += 1;
                }
            }
            b'}' | b']' => {
                self.push_capture_byte(b);
                if self.overflow > 0 {
                    self.overflow -= 1;
                } else if self.stack.pop().is_some() {
                    if self
                        .active
                        .as_ref()
                        .is_some_and(|a| !a.scalar && a.depth == self.depth())
                    {
                        self.finish_capture();
                    }
                    // A root object closed: the whole body, or one element of a root array.
                    if b == b'}' && self.stack.iter().all(|f| *f == Frame::Array) {
                        self.root_closed();
                    }
                }
            }
            b':' => {
                self.push_capture_byte(b);
                if let Some(Frame::Object { expecting_key, .. }) = self.stack.last_mut() {
                    *expecting_key = false;
                    self.pending = self.overflow == 0;
                }
            }
            b',' => {
                self.push_capture_byte(b);
                if let Some(Frame::Object { expecting_key, .. }) = self.stack.last_mut()
                    && self.overflow == 0
                {
                    *expecting_key = true;
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' => self.push_capture_byte(b),
            _ => {
                // A number or literal byte.
                self.value_starts(true);
                self.push_capture_byte(b);
            }
        }
    }

    /// A byte inside a string (key or value).
    fn string_byte(&mut self, b: u8) {
        self.push_capture_byte(b);
        if self.escape {
            self.escape = false;
            if self.string == Str::Key {
                self.key_byte(b);
            }
            return;
        }
        match b {
            b'\\' => {
                self.escape = true;
                if self.string == Str::Key {
                    self.key_byte(b);
                }
            }
            b'"' => {
                let was = std::mem::replace(&mut self.string, Str::No);
                if was == Str::Value
                    && self
                        .active
                        .as_ref()
                        .is_some_and(|a| a.scalar && a.depth == self.depth())
                {
                    self.finish_capture();
                }
            }
            _ => {
                if self.string == Str::Key {
                    self.key_byte(b);
                }
            }
        }
    }

    fn key_byte(&mut self, b: u8) {
        if let Some(Frame::Object { key, key_ok, .. }) = self.stack.last_mut() {
            if key.len() < MAX_KEY {
                key.push(b);
            } else {
                *key_ok = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(p: &[&[u8]]) -> bool {
        matches!(p, [b"usage" | b"model"] | [b"message", b"usage"])
    }

    fn scan(chunks: &[&[u8]]) -> Vec<Vec<(String, String)>> {
        let mut s = Scanner::new(wanted);
        for c in chunks {
            s.feed(c);
        }
        s.take_documents()
            .into_iter()
            .map(|d| {
                d.into_iter()
                    .map(|c| (c.path.join("."), String::from_utf8(c.raw).unwrap()))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn captures_wanted_values_only() {
        let body = br#"{"id":"x","model":"gpt-4o","choices":[{"usage":{"no":1}}],"usage":{"prompt_tokens":3,"d":{"a":[1,2]}},"message":{"usage":{"input_tokens":5}}}"#;
        let docs = scan(&[body]);
        assert_eq!(
            docs,
            vec![vec![
                ("model".into(), "\"gpt-4o\"".into()),
                (
                    "usage".into(),
                    r#"{"prompt_tokens":3,"d":{"a":[1,2]}}"#.into()
                ),
                ("message.usage".into(), r#"{"input_tokens":5}"#.into()),
            ]]
        );
    }

    #[test]
    fn scalars_strings_with_escapes_and_root_arrays() {
        let body = br#"[{"model":"a\"}b","usage":7}, {"usage" : null }]"#;
        let docs = scan(&[body]);
        assert_eq!(
            docs,
            vec![
                vec![
                    ("model".into(), r#""a\"}b""#.into()),
                    ("usage".into(), "7".into())
                ],
                vec![("usage".into(), "null".into())]
            ]
        );
    }

    #[test]
    fn any_split_gives_the_same_captures() {
        let body = br#"{"model":"m\u00e9","usage":{"prompt_tokens":12,"x":"},{"},"usage2":1}"#;
        let whole = scan(&[body]);
        for i in 0..=body.len() {
            assert_eq!(scan(&[&body[..i], &body[i..]]), whole, "split at {i}");
        }
    }

    #[test]
    fn oversized_values_are_dropped_not_kept() {
        let mut body = br#"{"usage":""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', MAX_CAPTURE + 10));
        body.extend(br#""}"#);
        let mut s = Scanner::new(wanted);
        s.feed(&body);
        assert_eq!(s.take_documents(), vec![vec![]]);
        assert!(s.oversized);
    }
}
