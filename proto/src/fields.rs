//! Field rules the contract states once for both services.
//!
//! Each parser takes the raw wire value and the field's name and returns either the clean
//! value or a [`Violation`] naming the field, ready to become a `google.rpc.BadRequest`
//! field violation.

use uuid::Uuid;

/// One bad field: the field's path in the request and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// The message of an INVALID_ARGUMENT status: every bad field, in request order.
pub fn violations_message(violations: &[Violation]) -> String {
    let fields: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect();
    format!("invalid request: {}", fields.join("; "))
}

/// Collects every violation of a request, so one answer names all bad fields.
#[derive(Debug, Default)]
pub struct Violations(Vec<Violation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the value of `result`, or records its violation and gives `None`.
    pub fn check<T>(&mut self, result: Result<T, Violation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    pub fn push(&mut self, violation: Violation) {
        self.0.push(violation);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<Violation> {
        self.0
    }
}

/// The largest page any list answers.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// The page size used when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Display names, after trimming, are at most this many characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 256;

/// Invisible characters that reorder or hide text: the bidirectional marks (U+061C, U+200E,
/// U+200F), embeddings, overrides and isolates, the zero-width space, the word joiner and
/// invisible operators, the byte-order mark. Refused in names so a name cannot pose as another
/// ("Bob" followed by a right-to-left override).
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200B}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// The zero-width non-joiner and joiner (U+200C, U+200D): Persian, Hindi and other scripts
/// spell words with them, and emoji sequences are joined by them, so names need them, but
/// only there. Each must stand between two visible characters outside ASCII (letters of such
/// a script, emoji): never at an end, next to a space or another invisible character, or
/// inside Latin text, where "Bo\u{200D}b" would pass for "Bob".
fn misplaced_joiner(name: &str) -> bool {
    let chars: Vec<char> = name.chars().collect();
    let joins =
        |c: char| !c.is_ascii() && !c.is_whitespace() && !is_joiner(c) && !is_invisible_format(c);
    chars.iter().enumerate().any(|(i, &c)| {
        let before = i.checked_sub(1).and_then(|j| chars.get(j));
        let after = chars.get(i + 1);
        is_joiner(c) && !(before.is_some_and(|&b| joins(b)) && after.is_some_and(|&a| joins(a)))
    })
}

fn is_joiner(c: char) -> bool {
    matches!(c, '\u{200C}' | '\u{200D}')
}

/// A display name: 1..=256 characters after trimming, no control characters (anywhere, even
/// where trimming would drop them), no invisible formatting characters, and joiners only where
/// a script or emoji needs them (between two visible non-ASCII characters). Returns the
/// trimmed name.
pub fn display_name(field: &str, raw: &str) -> Result<String, Violation> {
    if raw.chars().any(char::is_control) {
        return Err(Violation::new(field, "must not contain control characters"));
    }
    if raw.chars().any(is_invisible_format) {
        return Err(Violation::new(
            field,
            "must not contain invisible formatting characters (bidi controls, zero-width \
             spaces, the byte-order mark)",
        ));
    }
    if misplaced_joiner(raw) {
        return Err(Violation::new(
            field,
            "a zero-width joiner or non-joiner may only stand between two letters of a \
             script that uses it, or between emoji",
        ));
    }
    let trimmed = raw.trim();
    let chars = trimmed.chars().count();
    if chars == 0 {
        return Err(Violation::new(field, "must not be empty"));
    }
    if chars > MAX_DISPLAY_NAME_CHARS {
        return Err(Violation::new(
            field,
            format!("must be at most {MAX_DISPLAY_NAME_CHARS} characters, got {chars}"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// An id: a UUID in its canonical hyphenated form (any letter case). Returns it lower-cased.
pub fn id(field: &str, raw: &str) -> Result<Uuid, Violation> {
    if raw.is_empty() {
        return Err(Violation::new(field, "is required"));
    }
    match Uuid::try_parse(raw) {
        Ok(id) if raw.len() == 36 => Ok(id),
        _ => Err(Violation::new(
            field,
            "must be a UUID such as 123e4567-e89b-12d3-a456-426614174000",
        )),
    }
}

/// A page size: 0 means [`DEFAULT_PAGE_SIZE`], above [`MAX_PAGE_SIZE`] is clamped, negative
/// is a violation.
pub fn page_size(field: &str, raw: i32) -> Result<u32, Violation> {
    match u32::try_from(raw) {
        Err(_) => Err(Violation::new(field, "must not be negative")),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_are_trimmed_and_bounded() {
        assert_eq!(display_name("f", "  Contoso  ").as_deref(), Ok("Contoso"));
        assert!(display_name("f", "   ").is_err());
        assert!(display_name("f", "a\u{7}b").is_err());
        assert!(display_name("f", "Bob\n").is_err());
        assert!(display_name("f", "\tBob").is_err());
        let message = |name: &str| display_name("f", name).err().map(|v| v.description);
        assert!(message("Bob\u{202E}gnp.exe").is_some_and(|m| m.contains("bidi controls")));
        assert!(message("Bo\u{200D}b").is_some_and(|m| m.contains("zero-width joiner")));
        assert!(display_name("f", "Bo\u{200B}b").is_err());
        assert!(display_name("f", "Bob\u{2066}Admin\u{2069}").is_err());
        assert!(display_name("f", "\u{FEFF}Bob").is_err());
        // Names that need the zero-width non-joiner and joiner: Persian, an emoji sequence.
        assert!(
            display_name(
                "f",
                "\u{645}\u{6CC}\u{200C}\u{62E}\u{648}\u{627}\u{647}\u{645}"
            )
            .is_ok()
        );
        assert!(display_name("f", "Dev \u{1F469}\u{200D}\u{1F4BB}").is_ok());
        // Joiners anywhere else: alone, at an end, in Latin text, next to a space.
        for spoof in [
            "\u{200C}",
            "\u{200D}Bob",
            "Bob\u{200D}",
            "Bo\u{200D}b",
            "Bo\u{200C}b",
            "Bob \u{200D}\u{1F4BB}",
            "\u{645}\u{200C}\u{200C}\u{62E}",
            "\u{645}\u{61C}\u{62E}",
        ] {
            assert!(display_name("f", spoof).is_err(), "{spoof:?}");
        }
        assert!(display_name("f", &"é".repeat(256)).is_ok());
        assert!(display_name("f", &"é".repeat(257)).is_err());
    }

    #[test]
    fn ids_must_be_canonical_uuids() {
        assert!(id("f", "123e4567-e89b-12d3-a456-426614174000").is_ok());
        assert!(id("f", "123E4567-E89B-12D3-A456-426614174000").is_ok());
        assert!(id("f", "123e4567e89b12d3a456426614174000").is_err());
        assert!(id("f", "").is_err());
        assert!(id("f", "nope").is_err());
    }

    #[test]
    fn page_sizes_default_and_clamp() {
        assert_eq!(page_size("p", 0), Ok(50));
        assert_eq!(page_size("p", 7), Ok(7));
        assert_eq!(page_size("p", 5000), Ok(1000));
        assert!(page_size("p", -1).is_err());
    }
}

/// Property tests: the validators take any input without panicking, and what they accept
/// keeps the rule.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn display_names_that_pass_keep_the_rule(raw in any::<String>()) {
            if let Ok(name) = display_name("f", &raw) {
                prop_assert_eq!(name.trim(), name.as_str());
                prop_assert!((1..=MAX_DISPLAY_NAME_CHARS).contains(&name.chars().count()));
                prop_assert!(!name.chars().any(char::is_control));
            }
        }

        #[test]
        fn ids_that_pass_are_canonical(raw in any::<String>()) {
            if let Ok(id) = id("f", &raw) {
                prop_assert_eq!(id.to_string(), raw.to_ascii_lowercase());
            }
        }

        #[test]
        fn page_sizes_are_bounded(raw in any::<i32>()) {
            match page_size("p", raw) {
                Ok(n) => prop_assert!((1..=MAX_PAGE_SIZE).contains(&n)),
                Err(_) => prop_assert!(raw < 0),
            }
        }
    }
}
