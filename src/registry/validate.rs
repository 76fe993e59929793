//! Validation of user-supplied service definitions, before they are proposed.
//!
//! Owns the limits (lengths, counts, allowed characters). Does not parse
//! JSON: `api::body` turns request bodies into a `ServiceSpec` first.
//! Invariant: a spec that passes here can be stored and served back as JSON
//! and used as a storage key suffix without escaping.

use super::{CheckDef, ServiceSpec};

pub const MAX_NAME_LEN: usize = 256;
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_LEN: usize = 256;
pub const MAX_META: usize = 64;
pub const MAX_META_KEY_LEN: usize = 128;
pub const MAX_META_VALUE_LEN: usize = 512;
pub const MAX_ADDRESS_LEN: usize = 256;
pub const MAX_CHECKS: usize = 32;
pub const MAX_CHECK_BODY: usize = 4096;

/// Why a definition was refused; the message is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{field} is required")]
    Missing { field: &'static str },
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} has more than {max} entries")]
    TooMany { field: &'static str, max: usize },
    #[error("{field} {value:?} may only contain letters, digits, '-', '_', '.'{extra}")]
    BadChars {
        field: &'static str,
        value: String,
        extra: &'static str,
    },
    #[error("{field} must not contain control characters")]
    Control { field: &'static str },
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.chars().count() > max {
        return Err(ValidationError::TooLong { field, max });
    }
    Ok(())
}

fn check_ident(
    field: &'static str,
    s: &str,
    extra_chars: &'static str,
) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::Missing { field });
    }
    check_len(field, s, MAX_NAME_LEN)?;
    let ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || extra_chars.contains(c));
    if !ok {
        let extra = if extra_chars.is_empty() {
            ""
        } else {
            " and ':'"
        };
        return Err(ValidationError::BadChars {
            field,
            value: s.chars().take(64).collect(),
            extra,
        });
    }
    Ok(())
}

fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), ValidationError> {
    check_len(field, s, max)?;
    if s.chars().any(char::is_control) {
        return Err(ValidationError::Control { field });
    }
    Ok(())
}

/// Checks every field of `spec` against the limits above.
pub fn validate_service(spec: &ServiceSpec) -> Result<(), ValidationError> {
    check_ident("Name", &spec.name, "")?;
    check_ident("ID", &spec.id, ":")?;
    check_text("Address", &spec.address, MAX_ADDRESS_LEN)?;
    if spec.tags.len() > MAX_TAGS {
        return Err(ValidationError::TooMany {
            field: "Tags",
            max: MAX_TAGS,
        });
    }
    for t in &spec.tags {
        check_text("Tags", t, MAX_TAG_LEN)?;
    }
    if spec.meta.len() > MAX_META {
        return Err(ValidationError::TooMany {
            field: "Meta",
            max: MAX_META,
        });
    }
    for (k, v) in spec.meta.iter() {
        if k.is_empty() {
            return Err(ValidationError::Missing { field: "Meta key" });
        }
        check_len("Meta key", k, MAX_META_KEY_LEN)?;
        if !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ValidationError::BadChars {
                field: "Meta key",
                value: k.chars().take(64).collect(),
                extra: "",
            });
        }
        check_text("Meta value", v, MAX_META_VALUE_LEN)?;
    }
    if spec.checks.len() > MAX_CHECKS {
        return Err(ValidationError::TooMany {
            field: "Checks",
            max: MAX_CHECKS,
        });
    }
    for c in &spec.checks {
        validate_check(c)?;
    }
    Ok(())
}

/// Checks a check definition's identity and free-text fields.
pub fn validate_check(c: &CheckDef) -> Result<(), ValidationError> {
    if c.check_id.is_empty() {
        return Err(ValidationError::Missing { field: "CheckID" });
    }
    check_text("CheckID", &c.check_id, MAX_NAME_LEN)?;
    check_text("Check Name", &c.name, MAX_NAME_LEN)?;
    check_text("Check Notes", &c.notes, MAX_META_VALUE_LEN)?;
    for url in [&c.http, &c.tcp].into_iter().flatten() {
        check_text("Check target", url, MAX_ADDRESS_LEN * 4)?;
    }
    if c.body.as_ref().is_some_and(|b| b.len() > MAX_CHECK_BODY) {
        return Err(ValidationError::TooLong {
            field: "Check Body",
            max: MAX_CHECK_BODY,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_spec() -> ServiceSpec {
        ServiceSpec {
            id: "web-1:a".into(),
            name: "web".into(),
            ..ServiceSpec::default()
        }
    }

    #[test]
    fn accepts_a_plain_spec() {
        assert_eq!(validate_service(&ok_spec()), Ok(()));
    }

    #[test]
    fn refuses_empty_name_spaces_slashes_and_long_names() {
        for bad in ["", "a b", "a/b", &"x".repeat(1000)] {
            let mut s = ok_spec();
            s.name = bad.into();
            assert!(validate_service(&s).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn refuses_control_chars_in_tags_and_bad_meta_keys() {
        let mut s = ok_spec();
        s.tags = vec!["a\nb".into()];
        assert!(validate_service(&s).is_err());
        let mut s = ok_spec();
        s.meta.insert("bad key", "v");
        assert!(validate_service(&s).is_err());
    }
}
