//! Keys and holder labels as shown to a person (logs, the CLI, the dashboard's JS does the
//! same in `app.js`'s `shown`). The API accepts any character but controls in them, so a key
//! may carry invisible format characters (U+202E RIGHT-TO-LEFT OVERRIDE reverses the rest of
//! a line on a terminal, U+200B ZERO WIDTH SPACE makes two keys look alike). They are not
//! refused (stored keys are replayed and re-adopted through the same check, and a refusal now
//! would strand them): they are escaped where shown, as `\u{202E}`.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with every invisible or unprintable character (controls, format characters such as
/// U+202E and U+200B, line and paragraph separators, spaces other than U+0020, unassigned
/// code points, and the marks and letters that draw nothing: U+034F, variation selectors, the
/// Hangul fillers) written as `\u{XXXX}`; borrowed as it is when there is none. Other
/// combining marks stay: they show, on the character before them.
pub fn shown(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if hidden(c) {
            let _ = write!(out, "\\u{{{:04X}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Whether `c` does not show as itself: std's `Debug` escapes it (its Unicode tables of
/// printable characters), quotes, backslashes and combining marks aside. `Debug` escapes a
/// combining mark only at the start of a string, so `c` is probed after a letter.
fn hidden(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_control();
    }
    if draws_nothing(c) {
        return true;
    }
    let mut probe = String::with_capacity(5);
    probe.push('a');
    probe.push(c);
    probe.escape_debug().nth(1) == Some('\\')
}

/// Unicode's Default_Ignorable_Code_Point characters that `Debug` leaves as they are (marks and
/// letters, not format characters): a label with them looks like one without.
fn draws_nothing(c: char) -> bool {
    matches!(
        u32::from(c),
        0x034F | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180F | 0x3164
            | 0xFE00..=0xFE0F | 0xFFA0 | 0xE0100..=0xE01EF
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_characters_are_escaped() {
        assert_eq!(
            shown("org-\u{202E}7gro"),
            "org-\\u{202E}7gro",
            "right-to-left override"
        );
        assert_eq!(shown("a\u{200B}b"), "a\\u{200B}b", "zero width space");
        assert_eq!(shown("\u{FEFF}x\u{2066}"), "\\u{FEFF}x\\u{2066}");
        assert_eq!(shown("a\u{2028}b\u{00A0}c"), "a\\u{2028}b\\u{00A0}c");
        assert_eq!(shown("tab\there"), "tab\\u{0009}here");
        // Marks and letters that draw nothing: two labels alike but for them.
        assert_eq!(
            shown("a\u{034F}b"),
            "a\\u{034F}b",
            "combining grapheme joiner"
        );
        assert_eq!(shown("a\u{FE0F}"), "a\\u{FE0F}", "variation selector");
        assert_eq!(
            shown("\u{3164}x\u{FFA0}"),
            "\\u{3164}x\\u{FFA0}",
            "Hangul fillers"
        );
        assert_eq!(
            shown("e\u{0301}"),
            "e\u{0301}",
            "a combining mark that shows stays"
        );
    }

    #[test]
    fn visible_text_is_left_as_it_is() {
        for text in [
            "org-7",
            "worker-7/task 123",
            "Zürich",
            "e\u{301}t\u{e9}",
            "東京",
            "emoji 🚦",
            "q\"'\\",
        ] {
            assert!(
                matches!(shown(text), Cow::Borrowed(t) if t == text),
                "{text}"
            );
        }
    }
}
