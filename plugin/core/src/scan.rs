//! An incremental JSON scanner that keeps only a few small values.
//!
//! It is fed a byte stream in arbitrary chunks (a chunk may end inside a string, a number, an escape
//! or a UTF-8 character) and never holds a document: it tracks the container stack and the current
//! key of each object, and copies out only the values whose path the caller asked for (e.g.
//! `usage`, `message.usage`), each up to [`MAX_CAPTURE`] bytes, into one reused buffer. Memory is
//! bounded by [`MAX_DEPTH`] × [`MAX_KEY`] + the capture buffer (see [`MAX_ARENA`]), whatever the
//! response size, and a document costs no allocation once the buffers have grown.
//!
//! A "document" ends whenever a root object closes — the whole body, one element of a root array
//! (Gemini's non-SSE stream), or one SSE event's data — and is handed to the caller then.
//!
//! Most bytes of a response are inside strings nobody captures, or inside keys; both are crossed
//! a word at a time ([`find2`]), not byte by byte. A container no capture can be under (an element
//! of `choices`) is crossed counting only brackets and string boundaries, and the rest of a number
//! or literal nobody captures in one step.

/// Largest captured value; a larger one is dropped (and reported as oversized).
pub const MAX_CAPTURE: usize = 16 * 1024;
/// Deepest container tracked with its key; deeper levels are only counted.
pub const MAX_DEPTH: usize = 32;
/// Longest key remembered; longer keys never match.
pub const MAX_KEY: usize = 64;
/// Longest path of keys that can be captured.
pub const MAX_PATH: usize = 4;
/// Number of capture slots.
pub const SLOTS: usize = 16;
/// Most bytes the captures of one document may hold, counting values later replaced by a
/// capture of the same slot, before the buffer is compacted to the values still wanted (when those
/// are at most half of it). The buffer stays below twice the live values ([`SLOTS`] ×
/// [`MAX_CAPTURE`] at most) or [`MAX_ARENA`], whichever is larger, plus one capture.
pub const MAX_ARENA: usize = 4 * MAX_CAPTURE;

/// Decides which paths (object keys from the root) to capture, and into which slot (below
/// [`SLOTS`]): in a document, the last value captured into a slot is the one it holds.
pub type Wanted = fn(&[&[u8]]) -> Option<u8>;

/// Word constants of the searches below: each byte 0x01, and each byte's high bit.
const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The first position in `hay` of a byte the searches below look for, eight bytes at a time:
/// `flags` maps a little-endian word to one whose bytes' high bits mark the hits (the lowest
/// marked byte must be exact; higher ones may be false), `is` tests the last 0–7 bytes one by one.
#[inline]
fn first_flagged(hay: &[u8], flags: impl Fn(u64) -> u64, is: impl Fn(u8) -> bool) -> Option<usize> {
    let mut words = hay.chunks_exact(8);
    let mut at = 0;
    for w in words.by_ref() {
        let mut word = [0; 8];
        word.copy_from_slice(w);
        let found = flags(u64::from_le_bytes(word)) & HI;
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&c| is(c))
        .map(|p| at + p)
}

/// The first position of `a` or `b` in `hay`, eight bytes at a time.
pub fn find2(hay: &[u8], a: u8, b: u8) -> Option<usize> {
    let (pa, pb) = (LO * u64::from(a), LO * u64::from(b));
    first_flagged(
        hay,
        |v| {
            // A zero byte in `xa` or `xb` is a match (a borrow can only flag bytes above it).
            let (xa, xb) = (v ^ pa, v ^ pb);
            xa.wrapping_sub(LO) & !xa | xb.wrapping_sub(LO) & !xb
        },
        |c| c == a || c == b,
    )
}

/// The first position of a byte below `n` (at most 0x80) in `hay`, eight bytes at a time.
pub fn find_below(hay: &[u8], n: u8) -> Option<usize> {
    let below = LO * u64::from(n);
    // A byte below `n` borrows (a borrow can only flag bytes above it).
    first_flagged(hay, |v| v.wrapping_sub(below) & !v, |c| c < n)
}

/// A byte that continues a number or literal: anything but JSON's structure and whitespace.
fn is_scalar_byte(c: u8) -> bool {
    !matches!(
        c,
        b'"' | b'{' | b'}' | b'[' | b']' | b':' | b',' | b' ' | b'\t' | b'\r' | b'\n'
    )
}

/// The values one document captured, by slot.
#[derive(Debug, Clone, Copy)]
pub struct Document<'a> {
    arena: &'a [u8],
    slots: &'a [Option<(u32, u32)>; SLOTS],
}

impl<'a> Document<'a> {
    /// The raw JSON of the value captured into `slot`, if any.
    pub fn get(&self, slot: u8) -> Option<&'a [u8]> {
        let (start, end) = (*self.slots.get(usize::from(slot))?)?;
        self.arena.get(start as usize..end as usize)
    }
}

/// An object's current key, held inline: opening an object allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    bytes: [u8; MAX_KEY],
    len: usize,
}

impl Key {
    const EMPTY: Self = Self {
        bytes: [0; MAX_KEY],
        len: 0,
    };

    fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    /// Appends `more`; false (and nothing kept) when the key would be longer than [`MAX_KEY`].
    fn extend(&mut self, more: &[u8]) -> bool {
        match self.bytes.get_mut(self.len..self.len + more.len()) {
            Some(dst) => {
                dst.copy_from_slice(more);
                self.len += more.len();
                true
            }
            None => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    Object {
        key: Key,
        key_ok: bool,
        expecting_key: bool,
        /// The path to this object can still lead to a capture (see [`Scanner::value_path`]).
        reach: bool,
        /// Objects on the path from the root, this one included.
        objects: usize,
    },
    Array {
        reach: bool,
        objects: usize,
    },
}

impl Frame {
    /// For a container opened inside this one: whether its path can still lead to a capture,
    /// and the objects on it before the new container.
    fn child_reach(&self) -> (bool, usize) {
        match self {
            // An array after an object (e.g. `choices[0].usage`) is never captured through.
            Frame::Array { reach, objects } => (*reach && *objects == 0, *objects),
            Frame::Object {
                key_ok,
                reach,
                objects,
                ..
            } => (*reach && *key_ok && *objects < MAX_PATH, *objects),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Str {
    No,
    Key,
    Value,
}

#[derive(Debug, Clone)]
struct Active {
    slot: u8,
    /// Stack depth at which the captured value lives (its container, if any, is one deeper).
    depth: usize,
    /// Where its bytes start in the arena.
    start: usize,
    len: usize,
    oversized: bool,
    scalar: bool,
}

/// The scanner. `wanted` decides which paths to capture.
#[derive(Debug)]
pub struct Scanner {
    stack: Vec<Frame>,
    /// Levels beyond `MAX_DEPTH`.
    overflow: usize,
    /// Open containers of a value no capture can be under (e.g. `choices[0]`), being crossed
    /// without tracking keys: its bytes change nothing but this count and the string state.
    skip: usize,
    string: Str,
    escape: bool,
    /// Inside a scalar (number/true/false/null) that is not being captured.
    active: Option<Active>,
    wanted: Wanted,
    /// A `:` was seen and its value has not started yet.
    pending: bool,
    /// The captured bytes of the current document.
    arena: Vec<u8>,
    /// Each slot's value in the arena (start, end).
    slots: [Option<(u32, u32)>; SLOTS],
    /// Some value was too large to keep.
    pub oversized: bool,
    /// Times the capture buffer was compacted.
    compactions: usize,
}

impl Scanner {
    pub fn new(wanted: Wanted) -> Self {
        Self {
            stack: Vec::new(),
            overflow: 0,
            skip: 0,
            string: Str::No,
            escape: false,
            active: None,
            wanted,
            pending: false,
            arena: Vec::new(),
            slots: [None; SLOTS],
            oversized: false,
            compactions: 0,
        }
    }

    /// Forgets any partial document (an SSE event ended, whatever its data was).
    pub fn reset(&mut self) {
        self.stack.clear();
        self.overflow = 0;
        self.skip = 0;
        self.string = Str::No;
        self.escape = false;
        self.active = None;
        self.pending = false;
        self.arena.clear();
        self.slots = [None; SLOTS];
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
        // The top frame knows whether the path can lead to a capture: most values cannot (they
        // are inside `choices[…]`), and are refused here without walking the stack.
        match self.stack.last() {
            Some(Frame::Object {
                key_ok: true,
                reach: true,
                objects,
                ..
            }) if *objects <= MAX_PATH => {}
            Some(Frame::Array { reach: true, .. }) | None => {}
            _ => return None,
        }
        let mut path: [&[u8]; MAX_PATH] = [&[]; MAX_PATH];
        let mut len = 0;
        let mut seen_object = false;
        for f in &self.stack {
            match f {
                Frame::Array { .. } if seen_object => return None,
                Frame::Array { .. } => {}
                Frame::Object { key, key_ok, .. } => {
                    seen_object = true;
                    if !key_ok || len == MAX_PATH {
                        return None;
                    }
                    path[len] = key.as_slice();
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
                self.arena.truncate(a.start);
            } else if let Some(slot) = self.slots.get_mut(usize::from(a.slot)) {
                // Both fit in u32: the arena stays below MAX_ARENA + MAX_CAPTURE.
                #[allow(clippy::cast_possible_truncation)]
                let span = (a.start as u32, (a.start + a.len) as u32);
                *slot = Some(span);
            }
        }
    }

    fn push_capture_byte(&mut self, b: u8) {
        self.push_capture_bytes(std::slice::from_ref(&b));
    }

    fn push_capture_bytes(&mut self, bytes: &[u8]) {
        if let Some(a) = &mut self.active
            && !a.oversized
        {
            if a.len + bytes.len() <= MAX_CAPTURE {
                self.arena.extend_from_slice(bytes);
                a.len += bytes.len();
            } else {
                a.oversized = true;
            }
        }
    }

    /// Keeps only the values the slots still hold (repeated keys left older ones behind).
    fn compact(&mut self) {
        self.compactions += 1;
        let mut fresh = Vec::with_capacity(self.arena.len());
        for span in self.slots.iter_mut().flatten() {
            let (start, end) = (span.0 as usize, span.1 as usize);
            // Below MAX_ARENA: fits in u32.
            #[allow(clippy::cast_possible_truncation)]
            let at = fresh.len() as u32;
            fresh.extend_from_slice(self.arena.get(start..end).unwrap_or_default());
            *span = (at, at + (span.1 - span.0));
        }
        self.arena = fresh;
    }

    /// Called when a value starts at the current position (after `:` in an object, or as an array
    /// element / root value).
    #[inline]
    fn value_starts(&mut self, scalar: bool) {
        // Every byte of a number or literal comes here: only the first, after a `:`, goes on.
        if self.pending {
            self.pending = false;
            if self.active.is_none() {
                self.maybe_capture(scalar);
            }
        }
    }

    /// Starts capturing the value beginning here if its path is wanted.
    #[inline(never)]
    fn maybe_capture(&mut self, scalar: bool) {
        // Most values are a key of the root object: its path is that key alone.
        let slot = if let [
            Frame::Object {
                key, key_ok: true, ..
            },
        ] = self.stack.as_slice()
            && self.overflow == 0
        {
            (self.wanted)(&[key.as_slice()])
        } else {
            let Some((keys, len)) = self.value_path() else {
                return;
            };
            (self.wanted)(&keys[..len])
        };
        let Some(slot) = slot else {
            return;
        };
        // Compacted only when at least half of it is values since replaced, so a document of
        // large live values is not copied again at every key.
        if self.arena.len() > MAX_ARENA {
            let live: usize = self
                .slots
                .iter()
                .flatten()
                .map(|&(start, end)| (end - start) as usize)
                .sum();
            if self.arena.len() >= 2 * live {
                self.compact();
            }
        }
        self.active = Some(Active {
            slot,
            depth: self.depth(),
            start: self.arena.len(),
            len: 0,
            oversized: false,
            scalar,
        });
    }

    /// A root object closed: the document goes to `on_document`, and its buffers are reused.
    fn root_closed(&mut self, on_document: &mut impl FnMut(Document<'_>)) {
        on_document(Document {
            arena: &self.arena,
            slots: &self.slots,
        });
        self.arena.clear();
        self.slots = [None; SLOTS];
    }

    /// Feeds a chunk; each document completed in it is handed to `on_document`.
    pub fn feed(&mut self, chunk: &[u8], on_document: &mut impl FnMut(Document<'_>)) {
        let mut i = 0;
        while i < chunk.len() {
            if self.skip > 0 {
                i += self.skip_bytes(&chunk[i..]);
                continue;
            }
            // Fast path: the inside of a string (most of a response's bytes: keys, generated
            // text, base64, encrypted reasoning) is crossed up to its next quote or backslash in
            // one step; a key is remembered and a captured value copied as one slice.
            if self.string != Str::No && !self.escape {
                let rest = &chunk[i..];
                let run = find2(rest, b'"', b'\\').unwrap_or(rest.len());
                if run > 0 {
                    let part = &rest[..run];
                    if self.string == Str::Key {
                        self.key_bytes(part);
                    }
                    self.push_capture_bytes(part);
                    i += run;
                    if i == chunk.len() {
                        return;
                    }
                }
            }
            let b = chunk[i];
            // Fast path: a whole `"key":` in this chunk, with no escape, read in one step (what
            // the byte-level path would do with its quote, key run, quote and colon), and often
            // its value with it (see `whole_key`).
            if b == b'"'
                && let Some(used) = self.whole_key(&chunk[i + 1..])
            {
                i += 1 + used;
                continue;
            }
            i += 1;
            if self.byte(b, on_document) {
                // The rest of a number or literal no capture holds changes nothing.
                let rest = &chunk[i..];
                i += rest
                    .iter()
                    .position(|&c| !is_scalar_byte(c))
                    .unwrap_or(rest.len());
            }
        }
    }

    /// At a quote outside strings: when it opens a key of the innermost object (tracked, no
    /// capture running) whose closing quote and colon follow in `rest` with no escape between,
    /// takes the key and the colon at once — and, when its value is a string without escapes or
    /// a number or literal, the value (copied whole if it is captured) and a comma after it too.
    /// Returns the bytes of `rest` used; `None`, or fewer bytes, leave the rest to the
    /// byte-level path, in the state it would itself have reached there.
    #[inline]
    fn whole_key(&mut self, rest: &[u8]) -> Option<usize> {
        if self.string != Str::No || self.overflow > 0 || self.active.is_some() {
            return None;
        }
        let Some(Frame::Object {
            key,
            key_ok,
            expecting_key: expecting_key @ true,
            ..
        }) = self.stack.last_mut()
        else {
            return None;
        };
        let end = find2(rest, b'"', b'\\')?;
        if rest[end] != b'"' || rest.get(end + 1) != Some(&b':') {
            return None;
        }
        key.len = 0;
        *key_ok = key.extend(&rest[..end]);
        *expecting_key = false;
        let at = end + 2;
        // A value that starts right after the colon as a string or a scalar: its path is checked
        // here, as the byte-level path would at its first byte.
        let Some(&first) = rest.get(at).filter(|&&v| v == b'"' || is_scalar_byte(v)) else {
            self.pending = true;
            return Some(at);
        };
        // As `value_starts` would: broken JSON (`"a":,` or `"a":}`) can leave a colon's
        // `pending` standing, and the next value start must not check the path again.
        self.pending = false;
        self.maybe_capture(true);
        let captured = self.active.is_some();
        let after = if first == b'"' {
            match find2(&rest[at + 1..], b'"', b'\\') {
                Some(q) if rest[at + 1 + q] == b'"' => at + q + 2,
                // An escape, or the string goes on in the next chunk: the byte-level path reads
                // it from its opening quote (copying it if it is captured).
                _ => return Some(at),
            }
        } else {
            let Some(n) = rest[at..].iter().position(|&c| !is_scalar_byte(c)) else {
                // It goes on in the next chunk, where the byte-level path goes on with it.
                self.push_capture_bytes(&rest[at..]);
                return Some(rest.len());
            };
            at + n
        };
        if captured {
            // The whole value, quotes included, as the byte-level path would have copied it. That
            // path ends a captured scalar only at a delimiter or whitespace (in broken JSON a
            // quote or bracket may follow): anything else, it goes on from here.
            self.push_capture_bytes(&rest[at..after]);
            if first != b'"'
                && !matches!(
                    rest.get(after),
                    Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n')
                )
            {
                return Some(after);
            }
            self.finish_capture();
        }
        if rest.get(after) == Some(&b',') {
            if let Some(Frame::Object { expecting_key, .. }) = self.stack.last_mut() {
                *expecting_key = true;
            }
            return Some(after + 1);
        }
        Some(after)
    }

    /// Crosses the value being skipped up to the end of its outermost container; returns the
    /// bytes consumed (all of `rest` when it does not end there).
    fn skip_bytes(&mut self, rest: &[u8]) -> usize {
        let mut i = 0;
        while let Some(&b) = rest.get(i) {
            if self.string != Str::No {
                if self.escape {
                    self.escape = false;
                    i += 1;
                    continue;
                }
                let Some(at) = find2(&rest[i..], b'"', b'\\') else {
                    return rest.len();
                };
                i += at;
                if rest[i] == b'\\' {
                    self.escape = true;
                } else {
                    self.string = Str::No;
                }
                i += 1;
                continue;
            }
            i += 1;
            match b {
                b'"' => self.string = Str::Value,
                b'{' | b'[' => self.skip += 1,
                b'}' | b']' => {
                    self.skip -= 1;
                    if self.skip == 0 {
                        return i;
                    }
                }
                _ => {}
            }
        }
        rest.len()
    }

    /// One byte outside the string fast path; true when it began or continued a number or
    /// literal that no capture holds (the caller may then cross the rest of it at once).
    fn byte(&mut self, b: u8, on_document: &mut impl FnMut(Document<'_>)) -> bool {
        if self.string != Str::No {
            self.string_byte(b);
            return false;
        }
        // A scalar being captured ends at a delimiter or whitespace.
        if let Some(a) = &self.active
            && a.scalar
            && a.depth == self.depth()
            && (a.len > 0 || a.oversized)
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
                        key.len = 0;
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
            b'{' | b'[' => self.open(b),
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
                    if b == b'}' && self.stack.iter().all(|f| matches!(f, Frame::Array { .. })) {
                        self.root_closed(on_document);
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
                if self.active.is_none() {
                    return true;
                }
                self.push_capture_byte(b);
            }
        }
        false
    }

    /// A container opens (`b` is `{` or `[`).
    fn open(&mut self, b: u8) {
        self.value_starts(false);
        // A container no capture can be under, with none running: crossed by counting.
        if self.active.is_none()
            && self.overflow == 0
            && self.stack.last().is_some_and(|f| !f.child_reach().0)
        {
            self.skip = 1;
            return;
        }
        self.push_capture_byte(b);
        if self.stack.len() < MAX_DEPTH && self.overflow == 0 {
            let (reach, objects) = self.stack.last().map_or((true, 0), Frame::child_reach);
            self.stack.push(if b == b'{' {
                Frame::Object {
                    key: Key::EMPTY,
                    key_ok: false,
                    expecting_key: true,
                    reach,
                    objects: objects + 1,
                }
            } else {
                Frame::Array { reach, objects }
            });
        } else {
            self.overflow += 1;
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
        self.key_bytes(std::slice::from_ref(&b));
    }

    fn key_bytes(&mut self, bytes: &[u8]) {
        if let Some(Frame::Object { key, key_ok, .. }) = self.stack.last_mut()
            && !key.extend(bytes)
        {
            *key_ok = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 3] = ["model", "usage", "message.usage"];

    fn wanted(p: &[&[u8]]) -> Option<u8> {
        match p {
            [b"model"] => Some(0),
            [b"usage"] => Some(1),
            [b"message", b"usage"] => Some(2),
            _ => None,
        }
    }

    fn scan(chunks: &[&[u8]]) -> Vec<Vec<(String, String)>> {
        let mut s = Scanner::new(wanted);
        let mut docs = Vec::new();
        for c in chunks {
            s.feed(c, &mut |d: Document<'_>| {
                docs.push(
                    (0..3)
                        .filter_map(|slot| {
                            let raw = d.get(slot)?;
                            Some((
                                NAMES[usize::from(slot)].to_owned(),
                                String::from_utf8(raw.to_vec()).unwrap(),
                            ))
                        })
                        .collect(),
                );
            });
        }
        docs
    }

    #[test]
    fn finds_either_byte_at_any_position() {
        let hay: Vec<u8> = (0..40).map(|i| b'a' + (i % 20)).collect();
        for at in 0..hay.len() {
            for (x, other) in [(b'"', b'\\'), (b'\\', b'"')] {
                let mut h = hay.clone();
                h[at] = x;
                if at + 3 < h.len() {
                    h[at + 3] = other;
                }
                assert_eq!(find2(&h, b'"', b'\\'), Some(at), "at {at}");
            }
        }
        assert_eq!(find2(&hay, b'"', b'\\'), None);
        assert_eq!(find2(b"", b'"', b'\\'), None);
        // Bytes whose difference from the needle would borrow into the next byte.
        assert_eq!(find2(&[0x23, 0x01, 0x80, 0x22], b'"', b'\\'), Some(3));
    }

    #[test]
    fn finds_the_first_byte_below_a_bound_at_any_position() {
        // Bytes at and above the bound, UTF-8 continuation and lead bytes among them.
        let hay: Vec<u8> = (0..40)
            .map(|i| [b'\x0e', b' ', b'a', 0x80, 0xc3, 0xff][i % 6])
            .collect();
        assert_eq!(find_below(&hay, 0x0e), None);
        assert_eq!(find_below(b"", 0x0e), None);
        for at in 0..hay.len() {
            for x in [b'\n', b'\r', b'\t', 0] {
                let mut h = hay.clone();
                h[at] = x;
                // A second hit after the first, which must not be the one reported.
                if at + 1 < h.len() {
                    h[at + 1] = b'\n';
                }
                assert_eq!(find_below(&h, 0x0e), Some(at), "{x:#x} at {at}");
            }
        }
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
        let body = br#"{"model":"m\u00e9","usage":{"prompt_tokens":12,"x":"},{"},"usage2":1,"a_key_longer_than_eight_bytes":"and a value longer than that too","message":{"usage":{"k":"v\\"}}}"#;
        let whole = scan(&[body]);
        assert_eq!(whole[0].len(), 3);
        for i in 0..=body.len() {
            assert_eq!(scan(&[&body[..i], &body[i..]]), whole, "split at {i}");
        }
    }

    #[test]
    fn keys_read_whole_or_byte_by_byte_match_the_same_way() {
        // Keys the one-step reading must leave to the byte-level path (an escaped quote, a space
        // before the colon, an escape spelling a wanted key, a key longer than MAX_KEY that
        // starts with one) next to plain ones, whole and at every split.
        let long = format!("usage{}", "x".repeat(MAX_KEY));
        let body = format!(
            r#"{{"a\"usage":1,"usage" :2,"us\u0061ge":3,"model":"m","{long}":4,"k":{{"usage":5}}}}"#
        );
        let body = body.as_bytes();
        let expected = vec![vec![
            ("model".to_owned(), "\"m\"".to_owned()),
            ("usage".to_owned(), "2".to_owned()),
        ]];
        assert_eq!(scan(&[body]), expected);
        for i in 0..=body.len() {
            assert_eq!(scan(&[&body[..i], &body[i..]]), expected, "split at {i}");
        }
    }

    #[test]
    fn values_read_whole_are_captured_as_byte_by_byte_at_any_split() {
        // Captured and uncaptured strings and scalars after a whole key, then a comma, a space,
        // a closing brace or (broken JSON) a quote, bracket or colon right after a scalar: read
        // in one step when whole in a chunk, byte by byte when split, the same captures.
        for body in [
            &br#"{"usage":null,"model":"gpt","n":12,"s":"x"}"#[..],
            br#"{"n":-1.5e3 ,"usage":7 }"#,
            br#"{"usage":true}"#,
            br#"{"usage":7"x","model":"m"}"#,
            br#"{"usage":1[2],"model":"m"}"#,
            br#"{"usage":1:2,"model":"m"}"#,
            br#"{"model":"a\"b","usage":"u"}"#,
            // A colon with no value leaves its value start pending into the next pair.
            br#"{"id":,"usage":"x"{"prompt_tokens":100000,"completion_tokens":100000}}"#,
            br#"{"a":,"model":"m" "x"}"#,
            br#"{"a":{"b":},"usage":7 [1]}"#,
        ] {
            let whole = scan(&[body]);
            for i in 0..=body.len() {
                assert_eq!(
                    scan(&[&body[..i], &body[i..]]),
                    whole,
                    "{} split at {i}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        assert_eq!(
            scan(&[br#"{"usage":null,"model":"gpt","n":12,"s":"x"}"#]),
            vec![vec![
                ("model".to_owned(), "\"gpt\"".to_owned()),
                ("usage".to_owned(), "null".to_owned()),
            ]]
        );
    }

    #[test]
    fn values_no_capture_can_be_under_are_crossed_whole_at_any_split() {
        // `choices[…]` holds strings with brackets, quotes, escaped backslashes before a quote,
        // nested arrays and a `usage` key that must not be taken; numbers and literals around it
        // are not captured. The captures after it must still be found, whatever the split.
        let body = br#"{"created":1755137921,"choices":[{"index":0,"delta":{"content":"}]\\\"{[","usage":{"x":1}},"logprobs":null,"n":[[1,{"a":"]"}],true]},{"usage":2},{"c":"x\\"}],"model":"m","flag":false,"usage":{"prompt_tokens":12,"ok":true},"n2":-1.5e3}"#;
        let whole = scan(&[body]);
        assert_eq!(
            whole,
            vec![vec![
                ("model".into(), "\"m\"".into()),
                ("usage".into(), r#"{"prompt_tokens":12,"ok":true}"#.into()),
            ]]
        );
        for i in 0..=body.len() {
            assert_eq!(scan(&[&body[..i], &body[i..]]), whole, "split at {i}");
            for j in i..=body.len() {
                assert_eq!(
                    scan(&[&body[..i], &body[i..j], &body[j..]]),
                    whole,
                    "split at {i} and {j}"
                );
            }
        }
        // A captured scalar is still copied whole, not crossed.
        let docs = scan(&[br#"{"choices":[1],"usage":12345,"model":true}"#]);
        assert_eq!(
            docs,
            vec![vec![
                ("model".into(), "true".into()),
                ("usage".into(), "12345".into())
            ]]
        );
    }

    #[test]
    fn the_last_value_of_a_repeated_key_wins_and_memory_stays_bounded() {
        let mut body = br#"{"usage":1"#.to_vec();
        for i in 0..10_000 {
            body.extend(format!(r#","usage":"{i:0>10}""#).as_bytes());
        }
        body.extend(br#","model":"m"}"#);
        let mut s = Scanner::new(wanted);
        let mut seen = Vec::new();
        s.feed(&body, &mut |d: Document<'_>| {
            seen.push((d.get(1).map(<[u8]>::to_vec), d.get(0).map(<[u8]>::to_vec)));
        });
        assert_eq!(
            seen,
            vec![(Some(br#""0000009999""#.to_vec()), Some(br#""m""#.to_vec()))]
        );
        assert!(s.arena.capacity() <= 2 * (MAX_ARENA + MAX_CAPTURE));
    }

    #[test]
    fn large_live_values_are_not_compacted_again_at_every_key() {
        // Five near-limit values (more than MAX_ARENA live), then many small wanted keys: the
        // buffer is not rebuilt for each of them, so the scan stays linear.
        let wanted_all = |p: &[&[u8]]| match p {
            [k] if k.len() == 2 && k[0] == b'k' => Some(k[1] - b'0'),
            [b"t"] => Some(9),
            _ => None,
        };
        let mut body = b"{".to_vec();
        for k in 0..5 {
            body.extend(format!(r#""k{k}":"{}","#, "x".repeat(MAX_CAPTURE - 100)).as_bytes());
        }
        for _ in 0..20_000 {
            body.extend(br#""t":1,"#);
        }
        body.extend(br#""t":2}"#);
        let mut s = Scanner::new(wanted_all);
        let mut last = None;
        s.feed(&body, &mut |d: Document<'_>| {
            last = d.get(9).map(<[u8]>::to_vec);
        });
        assert_eq!(last.as_deref(), Some(&b"2"[..]));
        // Rebuilt at every key past MAX_ARENA, this would be ~20,000 copies of ~80 KB.
        assert!(s.compactions <= 1, "{} compactions", s.compactions);
    }

    #[test]
    fn oversized_values_are_dropped_not_kept() {
        let mut body = br#"{"usage":""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', MAX_CAPTURE + 10));
        body.extend(br#""}"#);
        let mut s = Scanner::new(wanted);
        let mut docs = 0;
        s.feed(&body, &mut |d: Document<'_>| {
            docs += 1;
            assert!(d.get(1).is_none());
        });
        assert_eq!(docs, 1);
        assert!(s.oversized);
    }
}
