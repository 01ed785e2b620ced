//! The `$filter` expressions the simulated service understands, parsed the way the real
//! one answers them (MDE-API.md): which form it is, and what it selects.

use std::time::SystemTime;

use tokio::time::Instant;

use super::actions::SimAction;
use crate::domain::{ActionId, format_time};

/// The `$filter` forms the simulated service understands; a test can refuse any of them with
/// a 400 (`SimConfig::rejected_filters`), as the real service may refuse undocumented ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterForm {
    /// No `$filter`: every action.
    None,
    /// `id in ('a','b')`
    IdIn,
    /// `id eq 'a' or id eq 'b'`
    IdEqOr,
    /// `status eq 'Pending'` (the documented form)
    StatusEq,
    /// `status in ('Pending','InProgress')`
    StatusIn,
    /// `status eq 'Pending' or status eq 'InProgress'`
    StatusEqOr,
    /// `creationDateTimeUtc ge 2026-11-28T10:00:00Z` (or `gt`)
    CreatedSince,
}

/// Which actions a list call selects.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Selection {
    All,
    Ids(Vec<ActionId>),
    Status(Vec<String>),
    CreatedSince { at: SystemTime, inclusive: bool },
}

impl Selection {
    pub(super) fn admits(&self, a: &SimAction, now: Instant) -> bool {
        match self {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&a.id),
            Selection::Status(statuses) => {
                let (_, status) = a.lifecycle.at(a.age(now));
                statuses.iter().any(|s| s == status.as_str())
            }
            Selection::CreatedSince { at, inclusive } => {
                // MDE compares its own seven-digit times; the simulator's are whole ms.
                let created = crate::domain::parse_time(&format_time(a.created_wall))
                    .unwrap_or(a.created_wall);
                if *inclusive {
                    created >= *at
                } else {
                    created > *at
                }
            }
        }
    }
}

fn quoted(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix('\'')?.strip_suffix('\'')?;
    (!inner.contains('\'')).then_some(inner)
}

/// Reads the terms of `field in ('a','b')`.
fn in_list<'a>(f: &'a str, field: &str) -> Option<Vec<&'a str>> {
    let rest = f.strip_prefix(field)?.trim_start().strip_prefix("in")?;
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner.split(',').map(quoted).collect()
}

/// Reads the terms of `field eq 'a' or field eq 'b'`.
fn eq_terms<'a>(f: &'a str, field: &str) -> Option<Vec<&'a str>> {
    f.split(" or ")
        .map(|term| {
            quoted(
                term.trim()
                    .strip_prefix(field)?
                    .trim_start()
                    .strip_prefix("eq")?,
            )
        })
        .collect()
}

/// Reads a `$filter`; anything it does not know is refused with a 400, as the service does.
pub(super) fn parse_filter(filter: &str) -> Option<(FilterForm, Selection)> {
    let f = filter.trim();
    if f.is_empty() {
        return Some((FilterForm::None, Selection::All));
    }
    let ids = |terms: Vec<&str>| -> Option<Vec<ActionId>> {
        terms.into_iter().map(|t| ActionId::parse(t).ok()).collect()
    };
    let statuses =
        |terms: Vec<&str>| Selection::Status(terms.into_iter().map(String::from).collect());
    if let Some(terms) = in_list(f, "id") {
        return Some((FilterForm::IdIn, Selection::Ids(ids(terms)?)));
    }
    if let Some(terms) = eq_terms(f, "id") {
        return Some((FilterForm::IdEqOr, Selection::Ids(ids(terms)?)));
    }
    if let Some(terms) = in_list(f, "status") {
        return Some((FilterForm::StatusIn, statuses(terms)));
    }
    if let Some(terms) = eq_terms(f, "status") {
        let form = if terms.len() == 1 {
            FilterForm::StatusEq
        } else {
            FilterForm::StatusEqOr
        };
        return Some((form, statuses(terms)));
    }
    let rest = f.strip_prefix("creationDateTimeUtc")?.trim_start();
    let (inclusive, time) = if let Some(t) = rest.strip_prefix("ge ") {
        (true, t)
    } else {
        (false, rest.strip_prefix("gt ")?)
    };
    let at = crate::domain::parse_time(time.trim())?;
    Some((
        FilterForm::CreatedSince,
        Selection::CreatedSince { at, inclusive },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse() {
        let a = "2e9da30d-27f6-4208-81f2-9cd3d67893ba";
        let b = "11111111-2222-3333-4444-555555555555";
        let form = |f: &str| parse_filter(f).map(|(form, _)| form);
        let ids = |f: &str| match parse_filter(f) {
            Some((_, Selection::Ids(ids))) => ids.len(),
            other => panic!("{f}: {other:?}"),
        };
        assert_eq!(ids(&format!("id in ('{a}','{b}')")), 2);
        assert_eq!(ids(&format!("id in ( '{a}' , '{b}' )")), 2);
        assert_eq!(ids(&format!("id eq '{a}' or id eq '{b}'")), 2);
        assert_eq!(form(&format!("id in ('{a}')")), Some(FilterForm::IdIn));
        assert_eq!(form(&format!("id in ('{a}') and x")), None);
        assert_eq!(form("id in ('not-an-id')"), None);
        assert_eq!(form(""), Some(FilterForm::None));
        assert_eq!(form("status eq 'Pending'"), Some(FilterForm::StatusEq));
        assert_eq!(
            form("status in ('Pending','InProgress')"),
            Some(FilterForm::StatusIn)
        );
        assert_eq!(
            form("status eq 'Pending' or status eq 'InProgress'"),
            Some(FilterForm::StatusEqOr)
        );
        assert_eq!(
            parse_filter("creationDateTimeUtc ge 2026-11-28T10:00:00.1234567Z"),
            Some((
                FilterForm::CreatedSince,
                Selection::CreatedSince {
                    at: crate::domain::parse_time("2026-11-28T10:00:00.1234567Z").unwrap(),
                    inclusive: true
                }
            ))
        );
        assert_eq!(form("creationDateTimeUtc lt 2026-11-28T10:00:00Z"), None);
        assert_eq!(form("status eq 'Pending' and machineId eq 'x'"), None);
    }
}
