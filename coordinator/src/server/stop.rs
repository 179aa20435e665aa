//! Stop strings over streamed text: text is released only once it can no longer be the
//! start of a stop string, so a stop string never reaches the client, whether it arrives
//! in one token or split over several.

/// Finds the first stop string in text that arrives piece by piece.
#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    /// Non-empty stop strings.
    stops: Vec<String>,
    /// Text not released yet.
    // Invariant: no stop string occurs in `held`, and `held` is the longest suffix of the
    // text so far that is a proper prefix of some stop string (empty when there is none).
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub(crate) fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds `text`; returns the text that is now safe to release and whether a stop string
    /// was found (then the released text is everything before it, and the rest is dropped).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_owned(), false);
        }
        self.held.push_str(text);
        // The earliest stop string wins; at one position, the first one listed.
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let mut out = std::mem::take(&mut self.held);
            out.truncate(at);
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// The text held back (no stop string came).
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .map(|(i, _)| i)
        .skip(1)
        .filter(|&len| text.ends_with(&stop[..len]))
        .max()
        .unwrap_or(0)
}
