//! Terminal-output streaming: cutting a producer's byte stream into chunks, pacing them, and
//! the wire form of the chunks (what a paused subscriber's skipped bytes are counted from).
//!
//! Invariant (`Chunker`): bytes are never altered, reordered or lost — the chunks, concatenated,
//! are the input, byte for byte — and every chunk holds 1..=`MAX_CHUNK` bytes. A cut never falls
//! inside a UTF-8 sequence that is valid (or could still become valid), nor inside the first
//! `MAX_CSI` bytes of a CSI / nF escape, the first `MAX_STRING` bytes of an OSC / DCS / SOS / PM /
//! APC string, or a two-byte escape. So for input made of valid UTF-8 and well-formed escapes no
//! longer than those limits, every chunk is valid UTF-8 on its own and holds only whole escape
//! sequences. The only exceptions are cuts the caller forces with `finish`.
//!
//! Everything up to the last safe cut goes out at once; only an unfinished tail is held back
//! (at most `MAX_HELD` bytes), until more input or `finish`.
//!
//! Pure: no sockets, no clocks (`Pacer` takes `now`), no threads.
//!
//! # The escape grammar
//!
//! After `ESC` (0x1B):
//! - `[` — CSI: bytes 0x20–0x3F (parameters, intermediates), ended by a final byte 0x40–0x7E
//!   (included). Any other byte (a C0 control, DEL, a byte ≥ 0x80, `ESC`) ends a malformed CSI
//!   before that byte.
//! - 0x20–0x2F — nF (e.g. `ESC ( B`): more 0x20–0x2F, ended by a final byte 0x30–0x7E; any other
//!   byte ends it before that byte.
//! - `]` OSC, `P` DCS, `X` SOS, `^` PM, `_` APC — a control string, ended by ST (`ESC \`,
//!   included), by BEL (OSC only, included), by CAN / SUB (not included), or aborted by an `ESC`
//!   that is not followed by `\` (the string ends before that `ESC`, which starts a new sequence).
//! - any other byte 0x30–0x7E — a two-byte escape (`ESC 7`, `ESC M`, `ESC \`, …).
//! - anything else — a lone, malformed `ESC` (one byte).
//!
//! # Deciding a cut without parsing everything
//!
//! In that grammar every sequence ends at or before the next `ESC`, except that an ST's `ESC`
//! belongs to the string it ends. So the only sequence a cut at `p` can fall inside is the one
//! introduced by the last `ESC` before `p`. `check` finds that `ESC` by scanning backward at most
//! `MAX_STRING` bytes (a sequence is only protected for its first `MAX_CSI` / `MAX_STRING`
//! bytes, so an `ESC` farther back cannot hold `p`), then parses forward from it to `p` (+2
//! bytes of look-ahead, for an ST or an aborting `ESC`). For UTF-8 it looks at most 3 bytes back
//! for a lead byte. When `p` is unsafe the cut moves to the start of the unit it falls in (the
//! lead byte or the `ESC`) and is checked again; the cut between a string and its ST's `ESC`
//! ends up at the string's own `ESC` that way. Each step moves back, and the whole walk spans at
//! most about `MAX_HELD` bytes. In plain text the cost per cut is one backward scan of at most
//! `MAX_STRING` bytes; in coloured output the last `ESC` is a few bytes away.
//!
//! # Limits
//!
//! - Long sequences are split: a CSI / nF still open `MAX_CSI` bytes after its `ESC`, or a
//!   string still open `MAX_STRING` bytes after its `ESC` (clipboard OSC 52, inline images,
//!   sixel DCS), may be cut anywhere past that point (never inside a UTF-8 character). This keeps
//!   the held tail small and the stream moving.
//! - Invalid UTF-8 passes as is: a stray continuation byte, a lead byte followed by a
//!   non-continuation, an invalid lead (0xC0, 0xC1, 0xF5–0xFF), overlongs and surrogates are
//!   never held. A lead byte at the very end of the input is held (it may still become valid)
//!   until the next push or `finish`.
//! - 8-bit C1 controls (0x9B CSI, 0x9D OSC, …) are not recognised: in a UTF-8 stream they are
//!   continuation bytes, and terminals in UTF-8 mode do not treat them as controls.
//! - Malformed input is cut where the grammar above says its sequence ends, which may differ from
//!   what a given terminal does (e.g. xterm executes a C0 control inside a CSI and carries on).
//! - An `ESC` (or a control string ending in `ESC`) at the very end of the input is held: the
//!   next byte decides what it is. A producer that stops there keeps it held until `finish`.
//! - Only the safety of a cut is guaranteed, not its position: chunks also follow the pushes
//!   (each push sends what it can), and a long sequence's forced cut falls wherever the input
//!   happened to end.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

/// Largest chunk, in bytes.
pub const MAX_CHUNK: usize = 4096;
/// A CSI or nF escape is kept whole only while it is at most this long (its `ESC` included).
pub const MAX_CSI: usize = 256;
/// An OSC / DCS / SOS / PM / APC string is kept whole only while it is at most this long (its
/// `ESC` and terminator included).
pub const MAX_STRING: usize = 1024;
/// Most bytes a `Chunker` holds back between calls.
pub const MAX_HELD: usize = MAX_STRING + 3;

const ESC: u8 = 0x1B;
const BEL: u8 = 0x07;
const CAN: u8 = 0x18;
const SUB: u8 = 0x1A;

/// Cuts one producer's output stream into chunks (see the module docs for the rules).
///
/// Chunks are slices of the chunker's buffer: chunks from one push share an allocation. A chunk
/// of invalid input is itself invalid UTF-8: check it before sending it as a text frame.
#[derive(Debug, Default)]
pub struct Chunker {
    /// Input not yet emitted; it always starts at a cut that was safe (or forced).
    buf: BytesMut,
}

impl Chunker {
    pub fn new() -> Chunker {
        Chunker::default()
    }

    /// Takes the next bytes of the stream and appends to `out` every chunk that can go now:
    /// everything up to the last safe cut, in chunks of at most `MAX_CHUNK` bytes.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<Bytes>) {
        self.buf.extend_from_slice(input);
        let end = last_safe_cut(&self.buf, self.buf.len());
        self.emit(end, out);
    }

    /// Emits whatever is held, even an unfinished sequence: at the end of the stream, or when
    /// the producer has gone quiet and the held bytes should go anyway. The chunker stays usable.
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        self.emit(self.buf.len(), out);
    }

    /// Bytes held back (an unfinished character or escape sequence), at most `MAX_HELD`.
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// Emits the first `end` bytes of the buffer (`end` is a safe or forced cut).
    fn emit(&mut self, mut end: usize, out: &mut Vec<Bytes>) {
        while end > 0 {
            let p = if end <= MAX_CHUNK {
                end
            } else {
                // Never 0: protected units are far shorter than a chunk (MAX_HELD < MAX_CHUNK).
                match last_safe_cut(&self.buf, MAX_CHUNK) {
                    0 => MAX_CHUNK,
                    q => q,
                }
            };
            out.push(self.buf.split_to(p).freeze());
            end -= p;
        }
    }
}

/// The largest safe cut in `1..=p`, or 0 when there is none.
fn last_safe_cut(b: &[u8], mut p: usize) -> usize {
    while p > 0 {
        match check(b, p) {
            Ok(()) => return p,
            Err(start) => p = start,
        }
    }
    0
}

/// Whether a cut at `p` (`0 < p <= b.len()`, with `b[0]` at a safe cut) is safe; if not, the
/// start of the unit it falls in (always `< p`).
fn check(b: &[u8], p: usize) -> Result<(), usize> {
    // UTF-8: the lead byte at most 3 bytes back, if its sequence would run past p.
    for k in 1..=p.min(3) {
        let x = b[p - k];
        if x & 0xC0 == 0x80 {
            continue;
        }
        let len = match x {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => 0,
        };
        if len > k {
            let s = p - k;
            match std::str::from_utf8(&b[s..(s + len).min(b.len())]) {
                // Valid, or a valid prefix cut short by the end of the input.
                Ok(_) => return Err(s),
                Err(e) if e.error_len().is_none() => return Err(s),
                Err(_) => {}
            }
        }
        break;
    }

    // Escapes: only the sequence of the last ESC before p can hold p.
    let from = p.saturating_sub(MAX_STRING);
    let Some(i) = b[from..p].iter().rposition(|&x| x == ESC) else {
        return Ok(());
    };
    let e = from + i;
    let limit = match b.get(e + 1) {
        Some(b'[' | 0x20..=0x2F) => MAX_CSI,
        Some(b']' | b'P' | b'X' | b'^' | b'_') => MAX_STRING,
        _ => 2, // a two-byte escape, a lone ESC, or ESC as the last byte
    };
    if p - e >= limit {
        return Ok(());
    }
    match sequence_end(b, e, b.len().min(p + 2)) {
        Some(end) if end <= p => Ok(()),
        _ => Err(e),
    }
}

/// Where the escape sequence starting with the `ESC` at `b[e]` ends (exclusive), if the bytes
/// before `stop` decide it.
fn sequence_end(b: &[u8], e: usize, stop: usize) -> Option<usize> {
    let k = e + 1;
    if k >= stop {
        return None;
    }
    match b[k] {
        b'[' => run(b, k + 1, stop, 0x20..=0x3F, 0x40..=0x7E),
        0x20..=0x2F => run(b, k + 1, stop, 0x20..=0x2F, 0x30..=0x7E),
        b']' | b'P' | b'X' | b'^' | b'_' => {
            let bel_ends = b[k] == b']';
            for j in k + 1..stop {
                match b[j] {
                    BEL if bel_ends => return Some(j + 1),
                    CAN | SUB => return Some(j),
                    ESC => {
                        let next = *b.get(j + 1).filter(|_| j + 1 < stop)?;
                        return Some(if next == b'\\' { j + 2 } else { j });
                    }
                    _ => {}
                }
            }
            None
        }
        0x30..=0x7E => Some(k + 1),
        _ => Some(k),
    }
}

/// A run of `more` bytes from `from`, ended by a `last` byte (included) or any other (excluded).
fn run(
    b: &[u8],
    from: usize,
    stop: usize,
    more: std::ops::RangeInclusive<u8>,
    last: std::ops::RangeInclusive<u8>,
) -> Option<usize> {
    let j = from
        + b[from.min(stop)..stop]
            .iter()
            .position(|x| !more.contains(x))?;
    Some(if last.contains(&b[j]) { j + 1 } else { j })
}

/// Throughput cap for one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacerConfig {
    /// Long-run rate; 0 means no cap.
    pub bytes_per_sec: u64,
    /// Most bytes that may go at once after a quiet spell; at most one second's worth
    /// (`bytes_per_sec`), larger values are clamped.
    pub burst_bytes: u64,
}

impl Default for PacerConfig {
    /// 1 MB/s, bursts of a quarter second's worth (250 kB).
    fn default() -> Self {
        PacerConfig {
            bytes_per_sec: 1_000_000,
            burst_bytes: 250_000,
        }
    }
}

/// A token bucket over bytes, kept as the time its debt is paid off (GCRA): a chunk of `n`
/// bytes costs `n / bytes_per_sec` seconds, and may go while the debt after it would be at most
/// the burst's worth of time. A chunk larger than the burst goes once the bucket is full (no
/// debt) and leaves the whole debt behind, so the long-run rate holds for any chunk size.
///
/// Invariant: if every chunk waits as `wait` says, what goes in any interval starting with a
/// full bucket is at most `burst + rate × interval`, plus one chunk.
#[derive(Debug, Clone)]
pub struct Pacer {
    bytes_per_sec: u64,
    burst: Duration,
    /// When the debt is paid off; None: never used (full bucket).
    paid_at: Option<Instant>,
}

impl Pacer {
    pub fn new(cfg: PacerConfig) -> Pacer {
        let mut pacer = Pacer {
            bytes_per_sec: cfg.bytes_per_sec,
            burst: Duration::ZERO,
            paid_at: None,
        };
        pacer.burst = pacer.cost(cfg.burst_bytes.min(cfg.bytes_per_sec));
        pacer
    }

    /// How long from `now` until a chunk of `n` bytes may go (zero: it may go now).
    pub fn wait(&self, now: Instant, n: usize) -> Duration {
        let Some(paid_at) = self.paid_at.filter(|_| self.bytes_per_sec > 0) else {
            return Duration::ZERO;
        };
        let slack = self.burst.saturating_sub(self.cost(n as u64));
        paid_at.saturating_duration_since(now).saturating_sub(slack)
    }

    /// Records that `n` bytes went at `now` (whether or not `wait` allowed it).
    pub fn take(&mut self, now: Instant, n: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let base = self.paid_at.map_or(now, |t| t.max(now));
        self.paid_at = Some(base.checked_add(self.cost(n as u64)).unwrap_or(base));
    }

    /// `take` if the chunk may go now, else how long to wait.
    pub fn try_take(&mut self, now: Instant, n: usize) -> Result<(), Duration> {
        match self.wait(now, n) {
            Duration::ZERO => {
                self.take(now, n);
                Ok(())
            }
            d => Err(d),
        }
    }

    /// `n` bytes' worth of time, rounded up (so rounding never raises the rate).
    fn cost(&self, n: u64) -> Duration {
        if self.bytes_per_sec == 0 {
            return Duration::ZERO;
        }
        let nanos = (u128::from(n) * 1_000_000_000).div_ceil(u128::from(self.bytes_per_sec));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Terminal output travels on `terminal:{task_id}` as ephemeral events `stdout` / `stderr`
/// (one chunk each) and `end` (a stream is over).
pub const CHANNEL_PREFIX: &str = "terminal:";

/// Whether an event is terminal output (what `pause` skips), not the end of a stream.
pub fn is_output(channel: &str, event: &str) -> bool {
    channel.starts_with(CHANNEL_PREFIX) && matches!(event, "stdout" | "stderr")
}

/// The `data` of an output event: where the chunk starts in its stream, its length in bytes,
/// and its text (a chunk that is not valid UTF-8 gets U+FFFD for the bad bytes, as a terminal
/// would show them; `bytes` and `offset` still count the producer's bytes).
pub fn chunk_data(offset: u64, chunk: &[u8]) -> String {
    let text = String::from_utf8_lossy(chunk);
    let text = serde_json::to_string(&text).expect("a string serializes");
    format!(
        "{{\"offset\":{offset},\"bytes\":{},\"text\":{text}}}",
        chunk.len()
    )
}

/// The chunk length an output event's `data` states (0 if it states none).
pub fn chunk_len(data: &str) -> u64 {
    #[derive(serde::Deserialize)]
    struct Len {
        bytes: u64,
    }
    serde_json::from_str::<Len>(data).map_or(0, |l| l.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `pieces` one push each, then finishes; returns the chunks.
    fn feed(pieces: &[&[u8]]) -> Vec<Bytes> {
        let mut c = Chunker::new();
        let mut out = Vec::new();
        for p in pieces {
            c.push(p, &mut out);
        }
        c.finish(&mut out);
        out
    }

    fn concat(chunks: &[Bytes]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    fn lens(chunks: &[Bytes]) -> Vec<usize> {
        chunks.iter().map(|c| c.len()).collect()
    }

    #[test]
    fn plain_text_goes_at_once_in_chunks_of_at_most_4096() {
        let mut c = Chunker::new();
        let mut out = Vec::new();
        c.push(b"hello\n", &mut out);
        assert_eq!(out, vec![Bytes::from_static(b"hello\n")]);
        assert_eq!(c.held(), 0);

        let big = vec![b'x'; 10_000];
        out.clear();
        c.push(&big, &mut out);
        assert_eq!(lens(&out), vec![4096, 4096, 1808]);
        assert_eq!(concat(&out), big);
        assert_eq!(c.held(), 0);
    }

    #[test]
    fn four_byte_char_straddling_the_chunk_limit_moves_whole() {
        let mut input = vec![b'a'; 4094];
        input.extend_from_slice("😀".as_bytes());
        input.extend_from_slice(b"bbbb");
        let out = feed(&[&input]);
        assert_eq!(lens(&out), vec![4094, 8]);
        assert!(out.iter().all(|c| std::str::from_utf8(c).is_ok()));
        assert_eq!(concat(&out), input);
    }

    #[test]
    fn incomplete_char_is_held_until_completed() {
        let euro = "€".as_bytes(); // E2 82 AC
        let mut c = Chunker::new();
        let mut out = Vec::new();
        c.push(&[b'a', euro[0]], &mut out);
        assert_eq!(out, vec![Bytes::from_static(b"a")]);
        c.push(&euro[1..2], &mut out);
        assert_eq!(c.held(), 2);
        c.push(&euro[2..], &mut out);
        assert_eq!(c.held(), 0);
        assert_eq!(out[1], Bytes::from_static("€".as_bytes()));
    }

    #[test]
    fn csi_colour_straddling_the_chunk_limit_moves_whole() {
        let sgr = b"\x1b[38;5;196m";
        for before in 4085..4096 {
            let mut input = vec![b'a'; before];
            input.extend_from_slice(sgr);
            input.extend_from_slice(b"red");
            let out = feed(&[&input]);
            let first = out[0].len();
            assert!(
                first == before || first >= before + sgr.len(),
                "{before}: {first}"
            );
            assert!(out.iter().all(|c| c.len() <= MAX_CHUNK));
            assert_eq!(concat(&out), input);
        }
    }

    #[test]
    fn csi_split_across_pushes_is_held_then_sent_whole() {
        let mut c = Chunker::new();
        let mut out = Vec::new();
        c.push(b"ok \x1b[38;5", &mut out);
        assert_eq!(out, vec![Bytes::from_static(b"ok ")]);
        c.push(b";196", &mut out);
        assert_eq!(out.len(), 1);
        c.push(b"mred", &mut out);
        assert_eq!(out[1], Bytes::from_static(b"\x1b[38;5;196mred"));
    }

    #[test]
    fn osc_title_with_bel_and_with_st() {
        for title in [
            &b"\x1b]0;build \xe2\x9c\x93\x07"[..],
            b"\x1b]0;build \xe2\x9c\x93\x1b\\",
        ] {
            // Every split point inside the title holds it back; the end lets it go whole.
            for cut in 1..title.len() {
                let mut c = Chunker::new();
                let mut out = Vec::new();
                c.push(b"$ ", &mut out);
                c.push(&title[..cut], &mut out);
                assert_eq!(lens(&out), vec![2], "cut {cut}");
                assert_eq!(c.held(), cut);
                c.push(&title[cut..], &mut out);
                assert_eq!(out[1], Bytes::copy_from_slice(title), "cut {cut}");
                assert_eq!(c.held(), 0);
            }
            // Straddling the chunk limit.
            let mut input = vec![b'a'; 4090];
            input.extend_from_slice(title);
            let out = feed(&[&input]);
            assert_eq!(lens(&out), vec![4090, title.len()]);
        }
    }

    #[test]
    fn dcs_and_other_strings_end_only_at_st() {
        let mut c = Chunker::new();
        let mut out = Vec::new();
        c.push(b"\x1bPq#0;2;0;0;0\x07more", &mut out);
        assert!(out.is_empty(), "BEL does not end a DCS");
        c.push(b"\x1b\\x", &mut out);
        assert_eq!(concat(&out), b"\x1bPq#0;2;0;0;0\x07more\x1b\\x");
        assert_eq!(c.held(), 0);
    }

    #[test]
    fn aborted_string_and_lone_esc() {
        // An OSC aborted by a CSI: the CSI is its own sequence, the cut may fall before it.
        let out = feed(&[b"\x1b]0;t\x1b[1mx"]);
        assert_eq!(concat(&out), b"\x1b]0;t\x1b[1mx");
        let mut c = Chunker::new();
        let mut out = Vec::new();
        c.push(b"a\x1b", &mut out);
        assert_eq!((lens(&out), c.held()), (vec![1], 1), "ESC at the end waits");
        c.push(b"\x1b", &mut out);
        assert_eq!(
            (lens(&out), c.held()),
            (vec![1, 1], 1),
            "ESC ESC: the first stands alone"
        );
        c.push(b"7", &mut out);
        assert_eq!((lens(&out), c.held()), (vec![1, 1, 2], 0));
        c.push(b"\x1b(", &mut out);
        assert_eq!(c.held(), 2, "nF open");
        c.push(b"B", &mut out);
        assert_eq!(out.last().unwrap(), &Bytes::from_static(b"\x1b(B"));
        // CAN and SUB cancel a sequence: nothing is left waiting.
        for cancelled in [&b"\x1b]0;ti\x18x"[..], b"\x1bPq\x1a", b"\x1b[1;\x18"] {
            out.clear();
            c.push(cancelled, &mut out);
            assert_eq!((concat(&out), c.held()), (cancelled.to_vec(), 0));
        }
    }

    #[test]
    fn byte_by_byte_input_gives_whole_units_as_soon_as_complete() {
        let input =
            "a€\x1b[1;31mé😀\x1b]8;;http://x/ü\x1b\\link\x1b]8;;\x07\x1b(B\x1b7z".as_bytes();
        let mut c = Chunker::new();
        let mut out = Vec::new();
        for &b in input {
            c.push(&[b], &mut out);
        }
        let expected: Vec<&[u8]> = vec![
            b"a",
            "€".as_bytes(),
            b"\x1b[1;31m",
            "é".as_bytes(),
            "😀".as_bytes(),
            "\x1b]8;;http://x/ü\x1b\\".as_bytes(),
            b"l",
            b"i",
            b"n",
            b"k",
            b"\x1b]8;;\x07",
            b"\x1b(B",
            b"\x1b7",
            b"z",
        ];
        assert_eq!(
            out,
            expected
                .into_iter()
                .map(Bytes::copy_from_slice)
                .collect::<Vec<_>>()
        );
        assert_eq!(c.held(), 0);
    }

    #[test]
    fn invalid_utf8_passes() {
        let mut c = Chunker::new();
        let mut out = Vec::new();
        for bad in [
            &b"\x80"[..],        // stray continuation
            b"\x80\x80\x80\x80", // several
            b"\xe2A",            // lead, then not a continuation
            b"\xe2\x82A",        // lead, continuation, then not
            b"\xc0\xaf",         // overlong
            b"\xed\xa0\x80",     // surrogate
            b"\xff\xfe",         // never valid
            b"\xf4\x90\x80\x80", // above U+10FFFF
        ] {
            out.clear();
            c.push(bad, &mut out);
            assert_eq!(concat(&out), bad, "{bad:x?}");
            assert_eq!(c.held(), 0, "{bad:x?}");
        }
        // A lead byte at the end might still become valid: held, then flushed by finish.
        out.clear();
        c.push(b"x\xf0\x9f", &mut out);
        assert_eq!((concat(&out), c.held()), (b"x".to_vec(), 2));
        c.finish(&mut out);
        assert_eq!(concat(&out), b"x\xf0\x9f");
        assert_eq!(c.held(), 0);
    }

    #[test]
    fn long_escapes_pass_split() {
        // An unterminated CSI: held for at most MAX_CSI bytes, then it moves.
        let mut c = Chunker::new();
        let mut out = Vec::new();
        c.push(b"\x1b[", &mut out);
        for _ in 0..1000 {
            c.push(b"1;", &mut out);
            assert!(c.held() <= MAX_CSI);
        }
        assert!(!out.is_empty());
        // Exactly at the limit: an open CSI is held up to MAX_CSI - 1 bytes, then goes.
        let mut c = Chunker::new();
        let mut out = Vec::new();
        c.push(b"\x1b[", &mut out);
        c.push(&[b'1'; MAX_CSI - 3], &mut out);
        assert_eq!((out.len(), c.held()), (0, MAX_CSI - 1));
        c.push(b"1", &mut out);
        assert_eq!((lens(&out), c.held()), (vec![MAX_CSI], 0));

        // A 1 MB clipboard OSC: split into chunks, never held past MAX_STRING.
        let mut osc = b"\x1b]52;c;".to_vec();
        osc.extend(std::iter::repeat_n(b'A', 1 << 20));
        osc.push(BEL);
        let mut c = Chunker::new();
        let mut out = Vec::new();
        for piece in osc.chunks(1000) {
            c.push(piece, &mut out);
            assert!(c.held() <= MAX_STRING);
        }
        assert_eq!(c.held(), 0);
        assert_eq!(concat(&out), osc);
        assert!(out.iter().all(|c| c.len() <= MAX_CHUNK));

        // A string of exactly MAX_STRING bytes is kept whole, even straddling the chunk limit.
        let mut input = vec![b'a'; 4000];
        input.extend_from_slice(b"\x1b]8;;");
        input.extend(std::iter::repeat_n(b'u', MAX_STRING - 7));
        input.extend_from_slice(b"\x1b\\");
        let out = feed(&[&input]);
        assert_eq!(lens(&out), vec![4000, MAX_STRING]);
    }

    #[test]
    fn finish_flushes_unfinished_sequences() {
        let mut c = Chunker::new();
        let mut out = Vec::new();
        c.push(b"$ \x1b]0;ti", &mut out);
        assert_eq!(c.held(), 6);
        c.finish(&mut out);
        assert_eq!(concat(&out), b"$ \x1b]0;ti");
        assert_eq!(c.held(), 0);
        c.finish(&mut out);
        assert_eq!(out.len(), 2, "nothing more");
    }

    #[test]
    fn pacer_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerConfig::default());
        let mut sent = 0;
        while p.try_take(t0, 4096).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 61, "61 × 4096 ≤ 250 000 < 62 × 4096");
        // The 62nd waits until 4096 bytes' worth has drained, less the leftover slack.
        let wait = p.wait(t0, 4096);
        assert_eq!(
            wait,
            Duration::from_micros(61 * 4096) - Duration::from_micros(250_000 - 4096)
        );
        assert!(p
            .try_take(t0 + wait - Duration::from_nanos(1), 4096)
            .is_err());
        assert!(p.try_take(t0 + wait, 4096).is_ok());
    }

    #[test]
    fn pacer_holds_the_long_run_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerConfig::default());
        let (mut now, mut bytes) = (t0, 0u64);
        while now < t0 + Duration::from_secs(10) {
            now += p.wait(now, 4096);
            p.take(now, 4096);
            bytes += 4096;
        }
        // 10 s of rate plus the burst, within a chunk.
        assert!(bytes <= 10_000_000 + 250_000 + 4096, "{bytes}");
        assert!(bytes >= 10_000_000 + 250_000 - 4096, "{bytes}");
    }

    #[test]
    fn pacer_edge_cases() {
        let t0 = Instant::now();
        // A chunk larger than the burst goes once the bucket is full, then the debt is paid.
        let mut p = Pacer::new(PacerConfig {
            bytes_per_sec: 1000,
            burst_bytes: 100,
        });
        assert!(p.try_take(t0, 500).is_ok());
        assert_eq!(p.wait(t0, 500), Duration::from_millis(500));
        assert_eq!(p.wait(t0, 10), Duration::from_millis(410));
        assert!(p.try_take(t0 + Duration::from_millis(500), 500).is_ok());
        // Time going backwards is taken as no time passing.
        assert_eq!(p.wait(t0, 500), Duration::from_secs(1));
        // Refill stops at the burst: after a long quiet spell only the burst goes at once.
        let later = t0 + Duration::from_secs(60);
        assert!(p.try_take(later, 100).is_ok());
        assert!(p.try_take(later, 1).is_err());
        // The burst is clamped to one second's worth.
        let mut p = Pacer::new(PacerConfig {
            bytes_per_sec: 1000,
            burst_bytes: 1_000_000,
        });
        assert!(p.try_take(t0, 1000).is_ok());
        assert!(p.try_take(t0, 1).is_err());
        // Rate 0: no cap.
        let mut p = Pacer::new(PacerConfig {
            bytes_per_sec: 0,
            burst_bytes: 0,
        });
        for _ in 0..1000 {
            assert!(p.try_take(t0, usize::MAX).is_ok());
        }
    }

    // ---- property test: a reference tokenizer built from the generated pieces ----

    #[derive(Debug, Clone)]
    enum Seg {
        /// Characters: a cut may fall between any two.
        Text(String),
        /// One well-formed escape sequence: no cut inside.
        Esc(Vec<u8>),
        /// Arbitrary bytes (only in the "anything" input).
        Raw(Vec<u8>),
    }

    /// Characters other than ESC, with runs of up to `run` repeated characters.
    fn text_runs(run: usize) -> impl Strategy<Value = Seg> {
        prop_oneof![
            3 => proptest::collection::vec(any::<char>().prop_map(|c| if c == '\x1b' { '?' } else { c }), 0..40)
                .prop_map(|cs| Seg::Text(cs.into_iter().collect())),
            1 => (0..run).prop_map(|n| Seg::Text("x".repeat(n))),
            1 => (0..run / 3, 0usize..4).prop_map(|(n, w)| {
                Seg::Text(["é", "€", "😀", "\u{80}"][w].repeat(n))
            }),
        ]
    }

    fn text() -> impl Strategy<Value = Seg> {
        text_runs(5000)
    }

    /// Body of a control string: any characters but ESC, CAN, SUB (and BEL for OSC).
    fn string_body(bel_ok: bool) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            any::<char>().prop_map(move |c| match c {
                '\x1b' | '\x18' | '\x1a' => '?',
                '\x07' if !bel_ok => '?',
                c => c,
            }),
            0..200,
        )
        .prop_map(|cs| cs.into_iter().collect::<String>().into_bytes())
    }

    fn escape() -> impl Strategy<Value = Seg> {
        let csi = (
            proptest::collection::vec(0x30u8..=0x3F, 0..20),
            proptest::collection::vec(0x20u8..=0x2F, 0..3),
            0x40u8..=0x7E,
        )
            .prop_map(|(p, i, f)| [&b"\x1b["[..], &p[..], &i[..], &[f][..]].concat());
        let nf = (
            proptest::collection::vec(0x20u8..=0x2F, 1..3),
            0x30u8..=0x7E,
        )
            .prop_map(|(i, f)| [&[ESC][..], &i[..], &[f][..]].concat());
        let two = (0x30u8..=0x7E).prop_map(|b| {
            // Not an introducer of a longer sequence.
            vec![ESC, if b"[]PX^_".contains(&b) { b'7' } else { b }]
        });
        let osc = (string_body(false), any::<bool>()).prop_map(|(body, bel)| {
            let end: &[u8] = if bel { b"\x07" } else { b"\x1b\\" };
            [&b"\x1b]"[..], &body[..], end].concat()
        });
        let other = (prop::sample::select(&b"PX^_"[..]), string_body(true))
            .prop_map(|(k, body)| [&[ESC, k][..], &body[..], &b"\x1b\\"[..]].concat());
        prop_oneof![
            3 => csi,
            1 => Just(b"\x1b[38;5;196m".to_vec()),
            1 => nf,
            1 => two,
            2 => osc,
            1 => other,
        ]
        .prop_map(Seg::Esc)
    }

    fn raw() -> impl Strategy<Value = Seg> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..20),
            proptest::collection::vec(
                prop::sample::select(&b"\x1b[]\\\x07\x80\xe2\xf0;m"[..]),
                0..20
            ),
        ]
        .prop_map(Seg::Raw)
    }

    fn splits() -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(prop_oneof![1usize..4, 1usize..9000], 1..20)
    }

    /// The input and, for each position, whether a cut there is between whole units.
    fn assemble(segs: &[Seg]) -> (Vec<u8>, Vec<bool>) {
        let mut input = Vec::new();
        let mut ok = vec![true];
        for s in segs {
            match s {
                Seg::Text(t) => {
                    for c in t.chars() {
                        let mut buf = [0; 4];
                        let len = c.encode_utf8(&mut buf).len();
                        input.extend_from_slice(&buf[..len]);
                        ok.extend((1..len).map(|_| false));
                        ok.push(true);
                    }
                }
                Seg::Esc(e) => {
                    input.extend_from_slice(e);
                    ok.extend((1..e.len()).map(|_| false));
                    ok.push(true);
                }
                Seg::Raw(r) => {
                    input.extend_from_slice(r);
                    ok.extend(r.iter().map(|_| true));
                }
            }
        }
        (input, ok)
    }

    /// Pushes `input` in pieces of the `splits` sizes (cycling); returns the chunks and, after
    /// each push, (bytes pushed, bytes emitted, bytes held).
    fn run_chunker(input: &[u8], splits: &[usize]) -> (Vec<Bytes>, Vec<(usize, usize, usize)>) {
        let mut c = Chunker::new();
        let mut out = Vec::new();
        let mut after = Vec::new();
        let (mut at, mut emitted) = (0, 0);
        for &n in splits.iter().cycle() {
            if at == input.len() {
                break;
            }
            let end = (at + n).min(input.len());
            let before = out.len();
            c.push(&input[at..end], &mut out);
            at = end;
            emitted += out[before..].iter().map(|b| b.len()).sum::<usize>();
            after.push((at, emitted, c.held()));
        }
        c.finish(&mut out);
        assert_eq!(c.held(), 0);
        (out, after)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_well_formed_input_is_cut_only_between_whole_units(
            segs in proptest::collection::vec(prop_oneof![3 => text(), 2 => escape()], 0..40),
            splits in splits(),
        ) {
            let (input, ok) = assemble(&segs);
            let (chunks, after) = run_chunker(&input, &splits);
            prop_assert_eq!(concat(&chunks), input.clone());
            let mut at = 0;
            for c in &chunks {
                prop_assert!(!c.is_empty() && c.len() <= MAX_CHUNK, "chunk of {}", c.len());
                prop_assert!(std::str::from_utf8(c).is_ok(), "chunk not UTF-8 at {}", at);
                at += c.len();
                prop_assert!(ok[at], "cut inside a unit at {}", at);
            }
            // As soon as possible: after each push, exactly up to the last unit boundary.
            for (pushed, emitted, held) in after {
                let boundary = (0..=pushed).rev().find(|&i| ok[i]).unwrap();
                prop_assert_eq!(emitted, boundary, "pushed {}", pushed);
                prop_assert_eq!(held, pushed - boundary);
            }
        }

        #[test]
        fn prop_every_cut_decision_matches_the_reference(
            segs in proptest::collection::vec(prop_oneof![3 => text_runs(300), 2 => escape()], 0..30),
        ) {
            let (input, ok) = assemble(&segs);
            for p in 1..=input.len() {
                // With everything after p known, and with the input ending at p.
                prop_assert_eq!(check(&input, p).is_ok(), ok[p], "at {}", p);
                prop_assert_eq!(check(&input[..p], p).is_ok(), ok[p], "end at {}", p);
                let boundary = (0..=p).rev().find(|&i| ok[i]).unwrap();
                prop_assert_eq!(last_safe_cut(&input, p), boundary, "walk back from {}", p);
            }
        }

        #[test]
        fn prop_any_input_passes_intact(
            segs in proptest::collection::vec(prop_oneof![2 => text(), 2 => escape(), 2 => raw()], 0..40),
            splits in splits(),
        ) {
            let (input, _) = assemble(&segs);
            let (chunks, after) = run_chunker(&input, &splits);
            prop_assert_eq!(concat(&chunks), input);
            for c in &chunks {
                prop_assert!(!c.is_empty() && c.len() <= MAX_CHUNK, "chunk of {}", c.len());
            }
            for (_, _, held) in after {
                prop_assert!(held <= MAX_HELD, "held {}", held);
            }
        }

        #[test]
        fn prop_random_bytes_never_stick(
            input in proptest::collection::vec(any::<u8>(), 0..20_000),
            splits in splits(),
        ) {
            let (chunks, after) = run_chunker(&input, &splits);
            prop_assert_eq!(concat(&chunks), input);
            prop_assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= MAX_CHUNK));
            prop_assert!(after.iter().all(|&(_, _, held)| held <= MAX_HELD));
        }
    }

    #[test]
    fn output_events_carry_offset_length_and_text() {
        let data = chunk_data(4096, "\u{1b}[32mok ✓\u{1b}[0m\n".as_bytes());
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["offset"], 4096);
        assert_eq!(v["text"], "\u{1b}[32mok ✓\u{1b}[0m\n");
        assert_eq!(chunk_len(&data), 16);
        assert_eq!(chunk_len("{}"), 0);
        assert!(is_output("terminal:t1", "stderr"));
        assert!(!is_output("terminal:t1", "end"));
        assert!(!is_output("task:t1", "stdout"));
    }
}
