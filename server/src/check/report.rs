//! What `check` found, and how it is printed: one line per check for people, one JSON object for scripts.

use serde::Serialize;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not run: something it depends on failed (named in the detail).
    Skip,
    /// Fine.
    Ok,
    /// Works, but an operator should look (the server starts).
    Warn,
    /// The server will not work correctly against this database.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier (`wal_level`, `publication`, …).
    pub name: &'static str,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (warn and fail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    /// A passing check.
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    /// A warning with its remedy.
    pub fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A failure with its remedy.
    pub fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A failure that `serve --migrate` repairs at start (it applies the migrations and re-applies policies/) is
    /// a warning when serve will run with it (`repaired`): a database behind a new binary, or policies of an older
    /// release.
    pub fn repaired_by_migrate(mut self, repaired: bool) -> Self {
        if repaired && self.status == Status::Fail {
            self.status = Status::Warn;
            self.detail
                .push_str(" (serve --migrate re-applies the schema and policies at start)");
        }
        self
    }

    /// A check that could not run.
    pub fn skip(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Skip,
            detail: detail.into(),
            fix: None,
        }
    }

    /// Folds findings into one line: the worst status wins, details and fixes are joined.
    pub fn from_findings(name: &'static str, ok_detail: String, findings: Vec<Finding>) -> Self {
        let Some(worst) = findings.iter().map(|f| f.status).max() else {
            return Self::ok(name, ok_detail);
        };
        // A fix that extends one already listed (`run migrate, or: alter table …`) replaces it, and one that another
        // extends is dropped: the remedy is said once.
        let mut fixes: Vec<String> = Vec::new();
        for f in &findings {
            if let Some(shorter) = fixes.iter_mut().find(|x| f.fix.starts_with(x.as_str())) {
                *shorter = f.fix.clone();
            } else if !fixes.iter().any(|x| x.starts_with(&f.fix)) {
                fixes.push(f.fix.clone());
            }
        }
        Self {
            name,
            status: worst,
            detail: findings
                .iter()
                .map(|f| f.detail.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            fix: Some(fixes.join("; ")),
        }
    }
}

/// One problem found by a check that can find several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Warn or fail.
    pub status: Status,
    /// What is wrong.
    pub detail: String,
    /// What to do.
    pub fix: String,
}

impl Finding {
    /// A failure.
    pub fn fail(detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            status: Status::Fail,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    /// A warning.
    pub fn warn(detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            status: Status::Warn,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

/// Exit status when every check passed (warnings allowed).
pub const EXIT_OK: u8 = 0;
/// Exit status when a check failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status when the database could not be reached.
pub const EXIT_UNREACHABLE: u8 = 2;

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// What was checked (the URL without its password).
    pub target: String,
    /// The checks in order.
    pub checks: Vec<Check>,
    /// The database could not be reached (exit 2).
    pub unreachable: bool,
}

impl Report {
    /// 0: no failure; 1: a check failed; 2: could not connect.
    pub fn exit_code(&self) -> u8 {
        if self.unreachable {
            EXIT_UNREACHABLE
        } else if self.checks.iter().any(|c| c.status == Status::Fail) {
            EXIT_FAILED
        } else {
            EXIT_OK
        }
    }

    /// The check called `name`.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// One line per check, `status  name  detail — fix: …`, then a summary line.
    pub fn to_text(&self) -> String {
        let mut out = format!("deeprecall-sync check: {}\n", self.target);
        for c in &self.checks {
            let mut line = format!("{:<5} {:<24} {}", c.status.label(), c.name, c.detail);
            if let Some(fix) = &c.fix {
                line.push_str(" — fix: ");
                line.push_str(fix);
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        let plural =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let mut summary = vec![
            plural(self.count(Status::Ok), "ok", "ok"),
            plural(self.count(Status::Warn), "warning", "warnings"),
            plural(self.count(Status::Fail), "failure", "failures"),
        ];
        let skipped = self.count(Status::Skip);
        if skipped > 0 {
            summary.push(format!("{skipped} skipped"));
        }
        let verdict = match self.exit_code() {
            EXIT_OK => "ready to serve",
            EXIT_FAILED => "not ready: fix the failures above",
            _ => "cannot connect",
        };
        out.push_str(&format!("{}: {verdict}\n", summary.join(", ")));
        out
    }

    /// `{"target", "ok", "exit_code", "counts", "checks": [{name, status, detail, fix?}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "target": self.target,
            "ok": self.exit_code() == EXIT_OK,
            "exit_code": self.exit_code(),
            "counts": {
                "ok": self.count(Status::Ok),
                "warn": self.count(Status::Warn),
                "fail": self.count(Status::Fail),
                "skip": self.count(Status::Skip),
            },
            "checks": self.checks,
        })
    }
}

/// Bytes for people: `512 B`, `3.2 MiB`.
pub fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checks: Vec<Check>) -> Report {
        Report {
            target: "postgres://u@h:5432/db".into(),
            checks,
            unreachable: false,
        }
    }

    #[test]
    fn exit_codes() {
        let ok = Check::ok("a", "fine");
        let warn = Check::warn("b", "meh", "do x");
        let fail = Check::fail("c", "broken", "do y");
        assert_eq!(report(vec![ok.clone(), warn.clone()]).exit_code(), 0);
        assert_eq!(report(vec![ok.clone(), warn, fail]).exit_code(), 1);
        let mut r = report(vec![ok]);
        r.unreachable = true;
        assert_eq!(r.exit_code(), 2);
    }

    #[test]
    fn findings_fold_into_the_worst_status() {
        let c = Check::from_findings(
            "grants",
            "all present".into(),
            vec![
                Finding::warn("w", "fix w"),
                Finding::fail("f", "fix f"),
                Finding::fail("g", "fix f"),
            ],
        );
        assert_eq!(c.status, Status::Fail);
        assert_eq!(c.detail, "w; f; g");
        assert_eq!(c.fix.as_deref(), Some("fix w; fix f"));
        // A remedy that another extends is said once, in its longer form, wherever it came first.
        let c = Check::from_findings(
            "row_level_security",
            "fine".into(),
            vec![
                Finding::fail("off", "run migrate"),
                Finding::fail(
                    "not forced",
                    "run migrate, or: alter table t force row level security",
                ),
                Finding::fail("policy", "run migrate"),
                Finding::warn("extra", "drop it"),
            ],
        );
        assert_eq!(
            c.fix.as_deref(),
            Some("run migrate, or: alter table t force row level security; drop it")
        );
        let c = Check::from_findings("grants", "all present".into(), vec![]);
        assert_eq!((c.status, c.detail.as_str()), (Status::Ok, "all present"));
    }

    #[test]
    fn text_has_one_line_per_check_and_a_summary() {
        let text = report(vec![
            Check::ok("wal_level", "logical"),
            Check::fail(
                "grants",
                "deeprecall_user lacks UPDATE on works",
                "run migrate",
            ),
        ])
        .to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("ok    wal_level "), "{text}");
        assert!(lines[2].starts_with("fail  grants "), "{text}");
        assert!(lines[2].ends_with("— fix: run migrate"), "{text}");
        assert_eq!(
            lines[3],
            "1 ok, 0 warnings, 1 failure: not ready: fix the failures above"
        );
    }

    #[test]
    fn json_shape() {
        let v = report(vec![Check::warn("slot", "lagging", "look")]).to_json();
        assert_eq!(v["ok"], true);
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v["counts"]["warn"], 1);
        assert_eq!(v["checks"][0]["status"], "warn");
        assert_eq!(v["checks"][0]["fix"], "look");
    }

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
    }
}
