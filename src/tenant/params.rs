//! Startup parameters a client may send (DESIGN.md §1.3), and the `options` parameter in
//! PostgreSQL's own syntax (`-c name=value`, `--name=value`, backslash escapes; see
//! `pg_split_opts` and `ParseLongOption` in the PostgreSQL sources).
//!
//! Settings are the guard's allow-list: anything not on it is refused with 08P01, and an
//! attempt to set a protected setting (the tenant context, roles, custom `x.y` settings) with
//! 42501. Accepted
//! settings are applied on the server connection with `set_config`, never put in the server's
//! startup packet.

use crate::config::PlacementKind;
use crate::error::{ClientError, sqlstate};
use crate::tenant::guard::is_settable;

/// Settings that decide who the session is or which rows it sees.
const PROTECTED: &[&str] = &[
    "role",
    "session_authorization",
    "session_replication_role",
    "row_security",
];

/// Startup parameters that are not settings.
const IDENTITY: &[&str] = &["user", "database"];

/// The settings a client asked for, in order, as `(name, value)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientSettings(pub Vec<(String, String)>);

impl ClientSettings {
    /// Checks every startup parameter except `_pq_.*` protocol options (negotiated away
    /// before this runs) and collects the settings to apply.
    pub fn from_startup(params: &[(String, String)]) -> Result<Self, ClientError> {
        let mut settings = Vec::new();
        for (name, value) in params {
            if IDENTITY.contains(&name.as_str()) || name.starts_with("_pq_.") {
                continue;
            }
            if name == "options" {
                for (n, v) in split_options(value)? {
                    settings.push(check(&n, v)?);
                }
            } else {
                settings.push(check(name, value.clone())?);
            }
        }
        Ok(ClientSettings(settings))
    }

    /// Refuses settings the tenant's placement does not allow: a schema tenant's
    /// `search_path` is bound by pgtenant.
    pub fn check_placement(&self, kind: PlacementKind) -> Result<(), ClientError> {
        if kind == PlacementKind::Schema
            && self
                .0
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("search_path"))
        {
            return Err(protected("search_path"));
        }
        Ok(())
    }
}

fn check(name: &str, value: String) -> Result<(String, String), ClientError> {
    let lower = name.to_ascii_lowercase();
    if lower.contains('.') || PROTECTED.contains(&lower.as_str()) {
        return Err(protected(name));
    }
    // The same settings a client may SET later; their values are checked by the guard.
    if !is_settable(&lower) {
        return Err(ClientError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("unsupported startup parameter: {name}"),
        )
        .with_hint(
            "pgtenant accepts user, database, options and common client settings such as \
             application_name, client_encoding, DateStyle and TimeZone",
        ));
    }
    Ok((name.to_owned(), value))
}

fn protected(name: &str) -> ClientError {
    ClientError::fatal(
        sqlstate::INSUFFICIENT_PRIVILEGE,
        format!("setting \"{name}\" is managed by pgtenant and cannot be set by clients"),
    )
}

/// Splits an `options` value into `(name, value)` settings. Only `-c name=value`,
/// `-cname=value` and `--name=value` are accepted; other server switches are refused.
pub fn split_options(options: &str) -> Result<Vec<(String, String)>, ClientError> {
    let words = split_words(options);
    let mut out = Vec::new();
    let mut iter = words.into_iter();
    while let Some(word) = iter.next() {
        let assignment = if word == "-c" {
            iter.next().ok_or_else(|| bad_option(&word))?
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_owned()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_owned()
        } else {
            return Err(bad_option(&word));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| bad_option(&assignment))?;
        // PostgreSQL accepts '-' for '_' in long option names.
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(out)
}

fn bad_option(word: &str) -> ClientError {
    ClientError::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("unsupported command-line option in \"options\": {word}"),
    )
    .with_hint("only -c name=value settings are accepted")
}

/// Whitespace-separated words; a backslash makes the next character literal.
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                current.push(next);
            }
            in_word = true;
        } else if c.is_ascii_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut current));
                in_word = false;
            }
        } else {
            current.push(c);
            in_word = true;
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn driver_startup_parameters_are_accepted() {
        // What pgjdbc sends.
        let s = ClientSettings::from_startup(&params(&[
            ("user", "app@acme"),
            ("database", "acme"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "Europe/Paris"),
            ("extra_float_digits", "2"),
            ("application_name", "PostgreSQL JDBC Driver"),
        ]))
        .unwrap();
        assert_eq!(s.0.len(), 5);
    }

    #[test]
    fn options_are_split_like_postgres_does() {
        assert_eq!(
            split_options(r"-c statement_timeout=5s --lock-timeout=1s -capplication_name=a\ b")
                .unwrap(),
            vec![
                ("statement_timeout".to_owned(), "5s".to_owned()),
                ("lock_timeout".to_owned(), "1s".to_owned()),
                ("application_name".to_owned(), "a b".to_owned()),
            ]
        );
        assert!(split_options("-B 100").is_err());
        assert!(split_options("-c").is_err());
        assert!(split_options("-c noequals").is_err());
    }

    #[test]
    fn protected_settings_are_refused_with_42501() {
        for p in [
            params(&[("app.current_tenant_id", "x")]),
            params(&[("options", "-c app.current_tenant_id=x")]),
            params(&[("options", "--app.current-tenant-id=x")]),
            params(&[("options", "-c role=postgres")]),
            params(&[("options", "-c session_authorization=postgres")]),
            params(&[("ROW_SECURITY", "off")]),
        ] {
            let e = ClientSettings::from_startup(&p).unwrap_err();
            assert_eq!(e.sqlstate, sqlstate::INSUFFICIENT_PRIVILEGE, "{p:?}");
        }
    }

    #[test]
    fn unknown_parameters_are_refused_with_08p01() {
        for p in [
            params(&[("replication", "database")]),
            params(&[("shared_buffers", "1GB")]),
            params(&[("options", "-c shared_preload_libraries=x")]),
        ] {
            let e = ClientSettings::from_startup(&p).unwrap_err();
            assert_eq!(e.sqlstate, sqlstate::PROTOCOL_VIOLATION, "{p:?}");
        }
    }

    #[test]
    fn search_path_depends_on_placement() {
        let s = ClientSettings::from_startup(&params(&[("search_path", "x")])).unwrap();
        assert!(s.check_placement(PlacementKind::Shared).is_ok());
        assert!(s.check_placement(PlacementKind::Dedicated).is_ok());
        assert_eq!(
            s.check_placement(PlacementKind::Schema)
                .unwrap_err()
                .sqlstate,
            sqlstate::INSUFFICIENT_PRIVILEGE
        );
    }
}
