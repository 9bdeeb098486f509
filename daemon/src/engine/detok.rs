//! Streaming text out of generated ids: incremental detokenization that never emits a split UTF-8
//! character (byte-level BPE tokens can end mid-character), and stop strings that are never
//! emitted, even when they arrive split across tokens.
use tokenizers::Tokenizer;

/// Decodes a growing id sequence into text deltas. A window of already-emitted ids is re-decoded
/// with the new ones, so that decoders which depend on neighbours (byte-level, metaspace) see
/// the context they need.
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
        tok.decode(ids, true).unwrap_or_default()
    }

    /// Adds one id; returns the text that is now complete.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let before = Self::decode(tok, &self.ids[self.prefix..self.read]);
        let now = Self::decode(tok, &self.ids[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(delta) = now.get(before.len()..) {
                let delta = delta.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                return delta;
            }
        }
        String::new()
    }

    /// Text still held back (an unfinished character at the very end of generation).
    pub fn flush(&mut self, tok: &Tokenizer) -> String {
        let before = Self::decode(tok, &self.ids[self.prefix..self.read]);
        let now = Self::decode(tok, &self.ids[self.prefix..]);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        now.get(before.len()..).unwrap_or_default().to_string()
    }
}

impl Default for Detokenizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds back text that could be the start of a stop string.
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

pub enum Filtered {
    /// Emit this text and go on.
    Emit(String),
    /// A stop string was reached: emit this text (what came before it) and finish.
    Stop(String),
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Filtered {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return Filtered::Emit(std::mem::take(&mut self.pending));
        }
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return Filtered::Stop(out);
        }
        // Longest suffix of `pending` that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.pending.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Filtered::Emit(out)
    }

    /// At the end of generation, held-back text was not a stop string after all.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match f.push(p) {
                Filtered::Emit(t) => out.push_str(&t),
                Filtered::Stop(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&f.flush());
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces_is_not_emitted() {
        assert_eq!(
            run(&["\n\nUser:"], &["Hi", " there\n", "\nUs", "er:", " x"]),
            ("Hi there".into(), true)
        );
    }

    #[test]
    fn near_miss_is_released() {
        assert_eq!(run(&["END"], &["the EN", "D", "!"]), ("the ".into(), true));
        assert_eq!(run(&["END"], &["the EN", "Dx"]).0, "the ".to_string());
        assert_eq!(run(&["END"], &["the EN", "d!"]), ("the ENd!".into(), false));
        assert_eq!(run(&["END"], &["tail EN"]), ("tail EN".into(), false));
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_is_safe() {
        assert_eq!(run(&["b", "寿司"], &["a寿司b"]), ("a".into(), true));
        assert_eq!(run(&["司x"], &["寿", "司"]), ("寿司".into(), false));
    }
}
