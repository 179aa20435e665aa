//! [`IdList`]: a set of layer or expert ids written as inclusive ranges, `"0-23,30"`.

use std::fmt;
use std::ops::RangeInclusive;

/// A non-empty set of ids, as plan files write them: comma-separated ids and
/// inclusive ranges (`"0-23,30"`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdList {
    /// Invariant: non-empty, sorted, disjoint and not adjacent (`start <= end`
    /// within each; `next.start > end + 1` between neighbours).
    ranges: Vec<(usize, usize)>,
}

impl IdList {
    /// The single id `id`.
    pub fn single(id: usize) -> IdList {
        IdList {
            ranges: vec![(id, id)],
        }
    }

    /// The ids `range` (inclusive), or `None` when it is empty.
    pub fn range(range: RangeInclusive<usize>) -> Option<IdList> {
        let (start, end) = range.into_inner();
        (start <= end).then(|| IdList {
            ranges: vec![(start, end)],
        })
    }

    /// The set of `ids` (any order, duplicates allowed), or `None` when there are none.
    pub fn from_ids(ids: impl IntoIterator<Item = usize>) -> Option<IdList> {
        let mut ids: Vec<usize> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for id in ids {
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == id => *end = id,
                _ => ranges.push((id, id)),
            }
        }
        (!ranges.is_empty()).then_some(IdList { ranges })
    }

    /// Parses `"0-23,30"`. Spaces around items are allowed; an id listed twice
    /// (`"0-5,3"`), a backwards range (`"5-3"`) or an empty item is an error
    /// that says which.
    pub fn parse(text: &str) -> Result<IdList, String> {
        let mut ranges = Vec::new();
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(format!(
                    "{text:?} has an empty item (write ids and ranges like \"0-23,30\")"
                ));
            }
            let parse = |s: &str| {
                let s = s.trim();
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "{text:?}: {item:?} is not an id or an inclusive range like \"0-23\""
                    ));
                }
                s.parse::<usize>()
                    .map_err(|_| format!("{text:?}: {s} is too large"))
            };
            let (start, end) = match item.split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => {
                    let id = parse(item)?;
                    (id, id)
                }
            };
            if start > end {
                return Err(format!(
                    "{text:?}: range {item:?} runs backwards (write {end}-{start})"
                ));
            }
            ranges.push((start, end));
        }
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            if pair[1].0 <= pair[0].1 {
                return Err(format!(
                    "{text:?}: id {} is listed more than once",
                    pair[1].0
                ));
            }
        }
        // Merge adjacent ranges so equal sets compare equal.
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some((_, last_end)) if *last_end + 1 == start => *last_end = end,
                _ => merged.push((start, end)),
            }
        }
        Ok(IdList { ranges: merged })
    }

    /// The inclusive ranges, sorted.
    pub fn ranges(&self) -> impl Iterator<Item = RangeInclusive<usize>> + '_ {
        self.ranges.iter().map(|&(a, b)| a..=b)
    }

    /// Every id, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.ranges().flatten()
    }

    /// The smallest id.
    pub fn min(&self) -> usize {
        self.ranges[0].0
    }

    /// The largest id.
    pub fn max(&self) -> usize {
        self.ranges[self.ranges.len() - 1].1
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: usize) -> bool {
        self.ranges.iter().any(|&(a, b)| (a..=b).contains(&id))
    }

    /// The number of ids.
    pub fn len(&self) -> usize {
        self.ranges
            .iter()
            .map(|&(a, b)| (b - a).saturating_add(1))
            .fold(0, usize::saturating_add)
    }

    /// Always false: an `IdList` holds at least one id.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for IdList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(a, b)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}
